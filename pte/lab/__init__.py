"""Research harnesses built on the library: the demo (:mod:`pte.lab.demo`), the mechanism check
(:mod:`pte.lab.mechanism`), the long-range task's base-model recipe (:mod:`pte.lab.pretrain`) and the benchmarks
(:mod:`pte.lab.bench`, :mod:`pte.lab.paper_memory`). They import the library; the library never imports them
(``tests/test_layout.py``), so a reader can take ``pte`` alone."""
