"""Summary of the per-warp stamps that bench/cuda/decode_ends_probe.patch writes ($VQ_WARP_STAMPS).

Usage: python3 bench/cuda/warp_stamps.py STAMPS_FILE WARPS_PER_CTA

One line a warp of the decode's last launch: entry, loop start, loop end (globaltimer ns), SM,
pages. Prints the spread of the warps' loop ends within each CTA, the CTAs' set-up, the SMs'
last ends, the share of the SMs' 16 warp slots in use, each warp index's page rate and, by the
order in which an SM's CTAs started, their entries, ends and pages (times in us from the first
entry).
"""
import sys, statistics as st
path, warps = sys.argv[1], int(sys.argv[2])
rows = [list(map(int, l.split())) for l in open(path) if l.strip()]
rows = [r for r in rows if r[0] > 0]
t0 = min(r[0] for r in rows)
us = lambda t: (t - t0) * 1e-3
ctas = {}
for i, r in enumerate(rows):
    ctas.setdefault(i // warps, []).append(r)
def q(v):
    v = sorted(v); return "min %.1f med %.1f p90 %.1f max %.1f" % (v[0], v[len(v)//2], v[int(0.9*(len(v)-1))], v[-1])
spread, idle, busy, ends_by_rank = [], 0.0, 0.0, {}
sm = {}
for c, ws in ctas.items():
    e = min(us(w[2]) for w in ws); E = max(us(w[2]) for w in ws)
    spread.append(E - e)
    entry = us(ws[0][0])
    for w in ws:
        idle += E - us(w[2]); busy += E - entry
    sm.setdefault(ws[0][3], []).append((entry, E, ws))
print("%s: %d CTAs x %d warps, first entry to last end %.1f us" % (path, len(ctas), warps, max(us(r[2]) for r in rows)))
print("  intra-CTA spread of warp loop ends (us):", q(spread))
print("  warp idle share inside CTAs (warps done, CTA not): %.1f%%" % (100 * idle / busy))
print("  CTA set-up (entry -> loop start, us):", q([us(w[1]) - us(w[0]) for ws in ctas.values() for w in ws[:1]]))
last = [max(E for _, E, _ in v) for v in sm.values()]
print("  SM last end (us):", q(last), " SMs:", len(sm))
# Warp slots in use: active warp time (entry -> loop end) over each SM's most warps at once,
# from the first entry to the last end.
def most_at_once(intervals):
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    n = top = 0
    for _, step in events:
        n += step
        top = max(top, n)
    return top
tot = sum(us(w[2]) - us(w[0]) for ws in ctas.values() for w in ws)
slots = sum(most_at_once([(us(w[0]), us(w[2])) for _, _, ws in v for w in ws]) for v in sm.values())
print("  warp slots in use: %.1f%% (%d warps at once an SM, median)" % (
    100 * tot / (slots * max(last)),
    st.median(most_at_once([(us(w[0]), us(w[2])) for _, _, ws in v for w in ws]) for v in sm.values())))
# loop rate by warp index and by CTA age on its SM
rate = {}
for ws in ctas.values():
    for k, w in enumerate(ws):
        d = us(w[2]) - us(w[1])
        if d > 0 and w[4] > 0: rate.setdefault(k, []).append(w[4] / d)
print("  pages/us per warp by warp index:", " ".join("%d:%.3f" % (k, st.mean(v)) for k, v in sorted(rate.items())))
byage = {}
for v in sm.values():
    for a, (entry, E, ws) in enumerate(sorted(v, key=lambda x: x[0])):
        pages = sum(w[4] for w in ws)
        byage.setdefault(a, []).append((entry, E, pages))
for a, v in sorted(byage.items()):
    print("  CTA #%d on its SM (%d): entry %s | end %s | pages med %d" % (a, len(v), q([x[0] for x in v]), q([x[1] for x in v]), st.median([x[2] for x in v])))
