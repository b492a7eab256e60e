"""Summarize an ncu source-level stall profile of one kernel.

Input: the CSV that `ncu --section SourceCounters --section WarpStateStats --page source
--print-source sass --csv ...` prints (one row per SASS instruction). Output: the share of warp
stall samples by opcode with its top stall reasons, the instructions with the most samples, and
the executed warp instructions and shared-memory wavefronts by opcode (divided by `per`, e.g.
the pages of the run, 131072 for 8 sequences of 128K tokens and 8 KV heads), and the share of
each warp state. Used for the decode tuning in
bench/cuda/decode_tuning.md:

    python3 bench/cuda/ncu_stall_summary.py src_k4v4.csv [top] [per]
"""
import collections
import csv
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> None:
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30
    per = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header_at = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    header = rows[header_at]
    data = [r for r in rows[header_at + 1:] if len(r) == len(header)]
    col = {name: i for i, name in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    total = sum(number(r[col[SAMPLES]]) for r in data)
    by_op = collections.Counter()
    op_reasons = collections.defaultdict(collections.Counter)
    for r in data:
        words = r[col["Source"]].split()
        op = (words[1] if words[0].startswith("@") else words[0]).split(".")[0]
        by_op[op] += number(r[col[SAMPLES]])
        for reason in reasons:
            op_reasons[op][reason] += number(r[col[reason]])
    print(f"{path}: {len(data)} instructions, {total:.0f} stall samples")
    states = collections.Counter()
    for r in data:
        for reason in reasons:
            states[reason] += number(r[col[reason]])
    print("warp states (share of samples): " +
          ", ".join(f"{k[6:]} {v / total * 100:.1f}" for k, v in states.most_common(10)))
    print("by opcode (share of samples; top reasons):")
    for op, samples in by_op.most_common(12):
        top4 = ", ".join(f"{k[6:]} {v / total * 100:.1f}" for k, v in op_reasons[op].most_common(4))
        print(f"  {op:8s} {samples / total * 100:5.1f}%  {top4}")
    print(f"top {top} instructions (index in the kernel's SASS):")
    order = sorted(range(len(data)), key=lambda i: -number(data[i][col[SAMPLES]]))
    for i in order[:top]:
        r = data[i]
        top2 = sorted(((number(r[col[k]]), k[6:]) for k in reasons), reverse=True)[:2]
        why = ", ".join(f"{k} {v:.0f}" for v, k in top2)
        print(f"  {i:5d} {number(r[col[SAMPLES]]) / total * 100:4.1f}%  "
              f"{r[col['Source']].strip()[:56]:56s} {why}")
    executed = collections.Counter()
    for r in data:
        words = r[col["Source"]].split()
        executed[words[1] if words[0].startswith("@") else words[0]] += number(
            r[col["Instructions Executed"]])
    print(f"executed warp instructions by opcode, divided by {per:g}: "
          f"{sum(executed.values()) / per:.1f} in all")
    for op, n in executed.most_common(24):
        print(f"  {op:24s} {n / per:9.1f}")
    wavefronts, ideal = collections.Counter(), collections.Counter()
    for r in data:
        words = r[col["Source"]].split()
        op = words[1] if words[0].startswith("@") else words[0]
        wavefronts[op] += number(r[col["L1 Wavefronts Shared"]])
        ideal[op] += number(r[col["L1 Wavefronts Shared Ideal"]])
    print(f"shared-memory wavefronts by opcode, divided by {per:g}: "
          f"{sum(wavefronts.values()) / per:.1f} in all")
    for op, n in wavefronts.most_common(8):
        if n > 0:
            print(f"  {op:24s} {n / per:9.1f}  (ideal {ideal[op] / per:.1f})")


if __name__ == "__main__":
    main()
