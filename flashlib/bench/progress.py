"""A progress bar for the long benchmark loops."""


def progress_bar(items, desc, disable=False):
    """`items` with a tqdm progress bar where tqdm is installed (it is optional: flashlib does not depend on it)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, disable=disable)
