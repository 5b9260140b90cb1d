"""`attnkit reproduce`: the papers' headline claims tested on one model, in one resumable command,
with a report that puts each claim, the paper's figure and ours side by side."""
