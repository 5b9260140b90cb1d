"""`attnkit reproduce`: the papers' headline claims tested on one model, in one resumable command,
with a report that puts each claim, the paper's figure and ours side by side."""

# The study's steps, in the order they run and are reported (study.py runs them, report.py renders them).
STEPS = ("heads", "ablate", "kv", "buckets", "s2a")
