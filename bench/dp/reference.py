#!/usr/bin/env python3
"""Reference epsilons for fl-server's RDP accountant (server/src/dp/accountant.rs), from Google's
dp-accounting, the accountant behind TensorFlow Privacy and TFF.

    D=${FL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fedtext}/dp-accounting-0.6.0
    python3 -m venv "$D" && "$D/bin/pip" install dp-accounting==0.6.0
    "$D/bin/python" bench/dp/reference.py

It prints one Rust tuple per case, (q, z, rounds, delta, epsilon, optimal order), the rows of
REFERENCE in the accountant's tests, then (q, z, order, rdp) for one round, the rows of
REFERENCE_RDP. The orders are the accountant's ORDERS, repeated here.

dp-accounting gives up on a fractional order whose series has not converged in 1000 terms (it logs
"failed to converge" and drops the order, which can only make epsilon larger); the Rust accountant
does the same, so both warnings and values are expected.
"""
import dp_accounting
from dp_accounting import rdp
from dp_accounting.rdp import rdp_privacy_accountant

ORDERS = [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 4.5] + [float(a) for a in range(5, 65)] + [
    80.0, 96.0, 128.0, 192.0, 256.0]

CASES = [
    # q, noise multiplier z, rounds, delta
    (0.01, 1.1, 1000, 1e-5),   # the DP-SGD paper's MNIST setting
    (0.1, 1.0, 100, 1e-5),
    (0.05, 0.5, 50, 1e-3),     # little noise: a fractional order wins
    (1.0, 2.0, 10, 1e-5),      # every client every round: no amplification
    (0.2, 0.8, 200, 100 ** -1.1),  # 100 clients, the default delta
    (0.001, 3.0, 10000, 1e-6),
    (0.5, 0.3, 5, 1e-5),       # very little noise: the smallest order
    (0.02, 5.0, 1, 1e-5),      # one round, much noise: a large order
]


def main():
    from importlib.metadata import version
    print(f"// dp-accounting {version('dp-accounting')}")
    for q, z, rounds, delta in CASES:
        acc = rdp.RdpAccountant(orders=ORDERS)
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
        eps, order = acc.get_epsilon_and_optimal_order(delta)
        print(f"({q!r}, {z!r}, {rounds}, {delta!r}, {float(eps)!r}, {float(order)!r}),")
    # RDP of one round at single orders: (q, z, order, rdp), the rows of REFERENCE_RDP.
    print("// RDP of one round")
    for q, z in [(0.01, 1.1), (0.1, 1.0), (0.5, 0.3), (1.0, 2.0)]:
        for order in [1.75, 2.5, 10.0, 256.0]:
            r = rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(q, z, [order])[0]
            print(f"({q!r}, {z!r}, {order!r}, {float(r)!r}),")


if __name__ == "__main__":
    main()
