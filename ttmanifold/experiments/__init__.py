"""The comparison harness behind ``ttmanifold compare``: benchmark problems
(:mod:`~ttmanifold.experiments.problems`), chart-based and Riemannian solvers with one
interface (:mod:`~ttmanifold.experiments.solvers`) and the command itself
(:mod:`~ttmanifold.experiments.compare`).

It needs the ``compare`` extra (matplotlib, scikit-learn, tqdm): ``pip install
"ttmanifold[compare]"``. ``import ttmanifold`` does not import this package.
"""
