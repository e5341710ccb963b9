"""The experiments run on top of the library, apart from it: ``report`` (one report of every run under a
run or sweep directory), ``reproduce`` (the papers' comparisons at small scale, with the papers' numbers in
``papers.yaml``) and ``pages`` (the marked sections these tools write into a shared markdown page)."""
