"""t3f (TensorFlow) peer of ``bench_manifold.py``.

Runs inside a separate venv that has TensorFlow and t3f (the main environment has PyTorch
only). ``bench_manifold.py`` starts it as a worker::

    $T3F_PYTHON benchmarks/_t3f_bench.py --serve

and talks to it in JSON lines on stdin/stdout (one request, one reply), so that each
timing sample of t3f is taken right next to the matching ttmanifold sample, under the
same machine load. Requests:

- ``{"cmd": "info"}``: versions, thread settings, t3f's sparse-projection API (if any);
- ``{"cmd": "load", "case": {...}, "warmup": w, "mem_budget_gib": g}``: read the input
  cores of one case from the ``.npz`` file written by ``bench_manifold.py``, build the
  ``tf.function`` of each operation and call each ``w`` times (tracing happens here);
  replies with the list of operations and notes;
  a case of ``"kind": "batch"`` reads cores with a leading batch dimension (X, T, Z) and
  one point (P) and builds t3f's batch operations (``retr_batch``, ``project_batch``);
- ``{"cmd": "time", "op": name, "clock": "wall" | "cpu"}``: one timed call, reply
  ``{"s": seconds}`` of wall time or of this process's CPU time;
- ``{"cmd": "check", "op": name}``: a norm of the last result (to compare with ttmanifold);
- ``{"cmd": "quit"}``.

``--spec SPEC.json`` runs the cases of a spec file in one go and prints one JSON object
(medians in ms), for use without ``bench_manifold.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import t3f  # noqa: E402


def tt_of(cores):
    return t3f.TensorTrain(list(cores))


def frob(cores) -> float:
    """Frobenius norm of a TT (or of a batch of TTs, stacked: the norm over all of them)."""
    if len(cores[0].shape) == 4:
        norms = t3f.frobenius_norm(t3f.TensorTrainBatch(list(cores)), epsilon=0.0).numpy()
        return float(np.sqrt(np.sum(norms ** 2)))
    return float(t3f.frobenius_norm(tt_of(cores), epsilon=0.0).numpy())


def loss_fn(A):
    """0.5 ||X - A||^2 written with t3f inner products (the same form as the torch side)."""

    def f(x):
        return (0.5 * t3f.flat_inner(x, x) - t3f.flat_inner(x, A)
                + 0.5 * t3f.flat_inner(A, A))

    return f


def general_loss_fn(A):
    """The same 0.5 ||X - A||^2 through t3f's TT algebra (a rank-3r difference and its
    squared norm), the counterpart of the general-loss row of ``bench_manifold.py``."""

    def f(x):
        return 0.5 * t3f.frobenius_norm_squared(x - A, differentiable=True)

    return f


def t3f_version() -> str:
    try:
        from importlib.metadata import version

        return version("t3f")
    except Exception:  # pragma: no cover
        return getattr(t3f, "__version__", "unknown")


def info():
    return dict(
        versions=dict(tensorflow=tf.__version__, t3f=t3f_version(), numpy=np.__version__,
                      python=sys.version.split()[0]),
        threads=dict(intra_op=tf.config.threading.get_intra_op_parallelism_threads(),
                     inter_op=tf.config.threading.get_inter_op_parallelism_threads()),
        sparse_projection_api=[n for n in dir(t3f) if "sparse" in n.lower()]
        + [n for n in dir(t3f.riemannian) if "sparse" in n.lower()],
    )


class Worker:
    def __init__(self):
        self.ops = {}  # name -> zero-argument callable returning a list of cores
        self.last = {}

    # -- cases ---------------------------------------------------------------------------
    def load(self, case, warmup, mem_budget_gib):
        self.ops, self.last = {}, {}
        notes = []
        dtype = tf.float64 if case["dtype"] == "float64" else tf.float32
        data = np.load(case["data"])
        d, r = case["d"], case["r"]

        def cores(prefix):
            return [tf.constant(data[f"{prefix}{k}"], dtype=dtype) for k in range(d)]

        if case.get("kind") == "batch":
            self._load_batch(cores("X"), cores("T"), cores("Z"), cores("P"), r)
            for name, fn in self.ops.items():
                for _ in range(warmup):
                    self.last[name] = fn()
            return dict(ops=list(self.ops), notes=notes)
        X, A = cores("X"), cores("A")
        if case.get("kind") == "sgd":
            self._load_sgd(X, A, r, case["lr"])
        else:
            Z = cores("Z")
            W = cores("W") if "W0" in data.files else Z
            self._load_ops(X, Z, A, W, r)
            if "idx" in data.files:
                idx = tf.constant(data["idx"], dtype=tf.int64)
                vals = tf.constant(data["vals"], dtype=dtype)
                N = int(idx.shape[0])
                # gather_nd keeps (N, 2r, 2r) core slices per mode for the backward pass
                need = 1.2 * d * N * (2 * r) ** 2 * dtype.size
                if need > mem_budget_gib * 2**30:
                    notes.append(
                        f"{case['dtype']}, r = {r}, N = {N}: t3f gather_nd autodiff not run, "
                        f"it would need ~{need / 2**30:.0f} GiB (> the {mem_budget_gib:g} "
                        f"GiB budget)")
                else:
                    self._load_sparse(X, idx, vals)
        for name, fn in self.ops.items():
            for _ in range(warmup):
                self.last[name] = fn()
        return dict(ops=list(self.ops), notes=notes)

    def _load_ops(self, X, Z, A, W, r):
        # 1. projection of a TT onto the tangent space at X
        @tf.function
        def project(x_cores, z_cores):
            return t3f.project(tt_of(z_cores), tt_of(x_cores)).tt_cores

        # 2. retraction round_r(X + xi), xi = P_X(W) (W: Z scaled by bench_manifold.py so
        # that ||xi|| = ||X|| / 2). t3f has no retraction function; its
        # Riemannian examples round X + xi. Two variants: the rank-2r sum in the tangent
        # format (add_n_projected of P_X(X) and xi, both precomputed outside the timing)
        # and the plain rank-3r t3f.add.
        xi = list(project(X, W))
        xp = list(project(X, X))

        @tf.function
        def retr_2r(xp_c, xi_c):
            a, b = tt_of(xp_c), tt_of(xi_c)
            anchor = object()
            a.projection_on = anchor
            b.projection_on = anchor
            return t3f.round(t3f.add_n_projected([a, b]), max_tt_rank=r).tt_cores

        @tf.function
        def retr_3r(x_c, xi_c):
            return t3f.round(t3f.add(tt_of(x_c), tt_of(xi_c)), max_tt_rank=r).tt_cores

        # 3. Riemannian autodiff
        @tf.function
        def rgrad(x_cores, a_cores):
            return t3f.gradients(loss_fn(tt_of(a_cores)), tt_of(x_cores),
                                 runtime_check=False).tt_cores

        # 4. Riemannian autodiff of the same f through TT algebra (no inner-product form)
        @tf.function
        def rgrad_general(x_cores, a_cores):
            return t3f.gradients(general_loss_fn(tt_of(a_cores)), tt_of(x_cores),
                                 runtime_check=False).tt_cores

        self.ops["project"] = lambda: project(X, Z)
        self.ops["rgrad_general"] = lambda: rgrad_general(X, A)
        self.ops["retr_2r"] = lambda: retr_2r(xp, xi)
        self.ops["retr_3r"] = lambda: retr_3r(X, xi)
        self.ops["rgrad"] = lambda: rgrad(X, A)

    def _load_batch(self, X, T, Z, P, r):
        # cores with a leading batch dimension: TensorTrainBatch. t3f batches the rounding
        # (retraction: round_r(X_b + T_b) of a rank-r point plus a rank-2r tangent TT,
        # the rank-3r sum of its examples) and the projection of a batch onto the tangent
        # space at one point P; it has no batch of points for project.
        def batch(cores):
            return t3f.TensorTrainBatch(list(cores))

        @tf.function
        def retr_batch(x_c, t_c):
            return t3f.round(t3f.add(batch(x_c), batch(t_c)), max_tt_rank=r).tt_cores

        @tf.function
        def project_batch(z_c, p_c):
            return t3f.project(batch(z_c), tt_of(p_c)).tt_cores

        self.ops["retr_batch"] = lambda: retr_batch(X, T)
        self.ops["project_batch"] = lambda: project_batch(Z, P)

    def _load_sparse(self, X, idx, vals):
        # t3f has no projection of a sparse tensor (t3f.project takes TT objects). Closest
        # equivalent: Riemannian autodiff of f(X) = sum_e v_e X[i_e] = <Z, X>, whose
        # Riemannian gradient is P_X(Z).
        @tf.function
        def sparse_grad(x_cores, idx, vals):
            def f(x):
                return tf.reduce_sum(vals * t3f.gather_nd(x, idx))

            return t3f.gradients(f, tt_of(x_cores), runtime_check=False).tt_cores

        self.ops["sparse_gather_nd"] = lambda: sparse_grad(X, idx, vals)

    def _load_sgd(self, X0, A, r, lr):
        X = [tf.Variable(c) for c in X0]

        d = len(X)

        @tf.function
        def step(a_cores):
            # X - lr g at rank 2r, in the basis of the gradient's tangent space: t3f.gradients
            # returns cores [[V_k, 0], [dU_k, U_k]] (first [dU_1, U_1], last [V_d; dU_d])
            # with U the left-orthogonal cores of X (t3f.orthogonalize_tt_cores), so that
            # X = U_1 ... U_{d-1} L_d is the same structure with the last delta L_d, the
            # last core of that orthogonalization; add_n_projected(coef=[1, -lr]) then
            # rounding to rank r (the rank-3r t3f.add of t3f's example is not needed)
            x = tt_of([v.read_value() for v in X])
            g = t3f.gradients(loss_fn(tt_of(a_cores)), x, runtime_check=False)
            last = t3f.orthogonalize_tt_cores(x).tt_cores[-1]
            gc = g.tt_cores
            h0 = gc[0].shape[2] // 2
            cores = [tf.concat([tf.zeros_like(gc[0][:, :, :h0]), gc[0][:, :, h0:]], axis=2)]
            for k in range(1, d - 1):
                hl, hr = gc[k].shape[0] // 2, gc[k].shape[2] // 2
                low = tf.concat([tf.zeros_like(gc[k][hl:, :, :hr]), gc[k][hl:, :, hr:]], axis=2)
                cores.append(tf.concat([gc[k][:hl], low], axis=0))
            hl = gc[-1].shape[0] // 2
            cores.append(tf.concat([gc[-1][:hl], last], axis=0))
            xt = tt_of(cores)
            xt.projection_on = g.projection_on
            new = t3f.round(t3f.add_n_projected([xt, g], coef=[1.0, -lr]), max_tt_rank=r)
            for v, c in zip(X, new.tt_cores):
                v.assign(c)
            return new.tt_cores

        @tf.function
        def step_3r(x_cores, a_cores):  # one step of t3f's example form, for the check only
            x = tt_of(x_cores)
            g = t3f.gradients(loss_fn(tt_of(a_cores)), x, runtime_check=False)
            return t3f.round(t3f.add(x, -lr * g), max_tt_rank=r).tt_cores

        self.ops["sgd_step"] = lambda: step(A)
        self._sgd_check = lambda: (step_3r([v.read_value() for v in X], A), step(A))

    # -- requests ------------------------------------------------------------------------
    def time(self, op, clock="wall", reps=1):
        """Seconds per call, averaged over ``reps`` back-to-back calls."""
        fn = self.ops[op]
        timer = time.process_time if clock == "cpu" else time.perf_counter
        s = timer()
        for _ in range(max(1, int(reps))):
            out = fn()
        dt = (timer() - s) / max(1, int(reps))
        self.last[op] = out
        return dt

    def check(self, op):
        return frob(self.last[op])

    def handle(self, req):
        cmd = req.get("cmd")
        if cmd == "info":
            return info()
        if cmd == "load":
            return self.load(req["case"], int(req.get("warmup", 1)),
                             float(req.get("mem_budget_gib", 8)))
        if cmd == "time":
            return dict(s=self.time(req["op"], req.get("clock", "wall"), req.get("reps", 1)))
        if cmd == "check":
            return dict(check=self.check(req["op"]))
        raise ValueError(f"unknown request {cmd!r}")


def serve():
    w = Worker()
    out = sys.stdout
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        req = json.loads(line)
        if req.get("cmd") == "quit":
            break
        try:
            rep = dict(ok=True, **w.handle(req))
        except Exception as e:  # report, keep serving
            rep = dict(ok=False, error=f"{type(e).__name__}: {e}")
        out.write(json.dumps(rep) + "\n")
        out.flush()


def run_spec(path):
    with open(path) as fh:
        spec = json.load(fh)
    w = Worker()
    results, notes = [], []
    for case in spec["cases"]:
        rep = w.load(case, spec.get("warmup", 2), spec.get("mem_budget_gib", 8))
        notes += rep["notes"]
        for op in rep["ops"]:
            ts = sorted(w.time(op) for _ in range(spec.get("repeats", 5)))
            results.append(dict(case, op=op, ms=1e3 * ts[len(ts) // 2], check=w.check(op)))
    print(json.dumps(dict(info(), results=results, notes=notes)))


def main(argv=None):
    ap = argparse.ArgumentParser(description="t3f peer of bench_manifold.py")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--serve", action="store_true", help="JSON-lines worker on stdin/stdout")
    g.add_argument("--spec", help="run the cases of a JSON spec file and print medians")
    ap.add_argument("--threads", type=int, default=None,
                    help="TensorFlow intra- and inter-op threads (default: TF's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if args.serve:
        serve()
    else:
        run_spec(args.spec)


if __name__ == "__main__":
    main()
