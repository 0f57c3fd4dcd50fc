"""Execute notebooks top to bottom (nbclient), several at once, and report each: `python tools/run_notebooks.py
[--jobs N] [--timeout S] [--out DIR] notebooks/*.ipynb`. Used on the GPU machine, where the book's CI cannot go;
--out writes the executed notebooks there. Exits non-zero if any notebook fails."""
import argparse
import concurrent.futures
import os
import sys
import time


def run(path, timeout, out):
    import nbformat
    from nbclient import NotebookClient
    t0 = time.time()
    nb = nbformat.read(path, as_version=4)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}}).execute()
        err = None
    except Exception as e:  # noqa: BLE001  (a failing cell: report it, go on with the others)
        err = f"{type(e).__name__}: {str(e)[-600:]}"
    if out:
        nbformat.write(nb, os.path.join(out, os.path.basename(path)))
    return path, time.time() - t0, err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("notebooks", nargs="+")
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as ex:
        results = list(ex.map(lambda p: run(p, a.timeout, a.out), a.notebooks))
    for path, secs, err in results:
        print(f"{'FAILED' if err else 'ok':6s} {secs:6.1f} s  {path}" + (f"\n       {err}" if err else ""), flush=True)
    return 1 if any(err for _, _, err in results) else 0


if __name__ == "__main__":
    sys.exit(main())
