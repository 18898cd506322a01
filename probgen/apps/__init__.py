"""Applications on top of the library: the ``probgen`` command line (:mod:`probgen.apps.cli`), the
evaluation protocol (:mod:`probgen.apps.evaluate`) and the side-by-side comparison with its reports
(:mod:`probgen.apps.compare`). They import ``probgen.models`` and ``probgen.inference``; nothing below
imports them."""
