import io, sys, time, shutil, json
from pathlib import Path
from rich.console import Console
from hepaseg.data.phantom import write_phantom_dataset
from hepaseg.data.prepare import prepare
def main():
    w = Path("/tmp/perf/pw2"); w.mkdir(exist_ok=True)
    if not (w/"src").exists():
        write_phantom_dataset(w/"src", "lits", n_cases=4, shape=(64, 512, 512), spacing=(1.6, 0.57, 0.57))
    n = int(sys.argv[1]); tag = sys.argv[2]
    out = w/f"out_{tag}"; shutil.rmtree(out, ignore_errors=True)
    kw = dict(window=(-200., 250.), size=224, slices="all", context_slices=1, split=(1.0, 0.0, 0.0), progress=False,
              console=Console(file=io.StringIO()))
    rep = {}
    if n > 0: kw.update(workers=n, report=rep)
    t = time.perf_counter(); m = prepare(w/"src", out, **kw); s = time.perf_counter() - t
    print(json.dumps({"tag": tag, "workers": n, "slices": m["n_slices"], "seconds": round(s, 2), "slices_per_s": round(m["n_slices"] / s, 1),
                      "peak_rss_mb": {k: round(v) for k, v in rep.get("peak_rss_mb", {}).items()}}))
if __name__ == "__main__":
    main()
