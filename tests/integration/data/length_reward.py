"""A custom reward for tests: varies with the completion, so even an untrained policy gets a signal."""


def score(completion: str, ground_truth, **fields) -> dict:
    return {"score": float(len(completion) % 2 == 0), "length": float(len(completion))}
