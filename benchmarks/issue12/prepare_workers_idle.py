"""prepare --workers 1 vs 2 on 6 LiTS-layout phantoms of 160 x 512 x 512 (a multi-case set), wall clock, CLI."""
import subprocess, sys, time, pathlib, shutil, os
from hepaseg.data.phantom import write_phantom_dataset
work = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "prepare_workers_bench")
if work.exists() and any(work.iterdir()):
    sys.exit(f"{work}: not empty: expected a new or empty folder (this script deletes nothing)")
work.mkdir(parents=True, exist_ok=True)
src = work / "src"
write_phantom_dataset(src, "lits", n_cases=int(os.environ.get("CASES", 6)),
                      shape=(int(os.environ.get("SLICES", 160)), 512, 512), spacing=(1.6, 0.57, 0.57))
hep = [sys.executable, "-m", "hepaseg.cli"]
times = {}
for rnd in range(int(os.environ.get("ROUNDS", 2))):
    for n in (1, 2):
        out = work / f"out_w{n}_{rnd}"
        t = time.perf_counter()
        r = subprocess.run([*hep, "prepare", str(src), "--out", str(out), "--slices", "all", "--split", "1,0,0",
                            "--workers", str(n), "--no-progress"], capture_output=True, text=True)
        dt = time.perf_counter() - t
        assert r.returncode == 0, r.stderr[-2000:]
        times.setdefault(n, []).append(dt)
        print(f"round {rnd} workers {n}: {dt:.1f} s, load {os.getloadavg()[0]:.2f}", flush=True)
        print("   " + " | ".join(l for l in r.stdout.splitlines() if "worker" in l or "slices" in l)[:400], flush=True)
same = all(a.read_bytes() == (work / "out_w2_0" / a.relative_to(work / "out_w1_0")).read_bytes()
           for a in sorted((work / "out_w1_0").rglob("*")) if a.is_file() and a.name != ".hepaseg-output.json")
print("identical:", same, "speed-up per round:", [round(a / b, 2) for a, b in zip(times[1], times[2])])
