"""A model-free replay of continuous batching's scheduler (apd_jax.decoding.continuous.decode) over a
workload's budgets: each row takes ceil(budget / tokens_per_pass) passes; the host refills free slots a
group at a time and runs the loop until at least (free slots + group) rows are done, as `decode` does.
Prints passes, occupancy and refills for fixed batches (file order and sorted by budget) and for
continuous batching at several groups, in file order and largest budget first. A prediction, not a
measurement: a refill also makes the next pass wider (its first pass), which `passes + refills` counts
as one more pass.

    python docs/benchmarks/2026-12-07-cpu/scheduler_replay.py > scheduler_replay.txt
"""

import math

from apd_jax.bench.workload import draw_budgets

TOKENS_PER_PASS = 2.2  # random weights at the real shapes accept about 2.2 tokens per row-pass


def replay(passes: list[int], size: int, group: int, order: list[int]) -> tuple[int, float, int]:
    """(loop passes, occupancy, refills) of rows needing `passes[i]` passes through `size` slots."""
    queue, left, holder = list(order), [0] * size, [-1] * size
    total = busy = refills = 0
    while True:
        free = [s for s in range(size) if holder[s] < 0]
        while queue and free:
            taken = [queue.pop(0) for _ in range(min(group, len(queue), len(free)))]
            refills += 1
            for s, r in zip(free, taken):
                holder[s], left[s] = r, passes[r]
            free = free[len(taken):]
        if len(free) == size:
            return total, busy / (total * size), refills
        until = min(len(free) + group, size)
        while sum(holder[s] < 0 or left[s] == 0 for s in range(size)) < until:
            total += 1
            for s in range(size):
                if holder[s] >= 0 and left[s] > 0:
                    left[s] -= 1
                    busy += 1
        for s in range(size):
            if holder[s] >= 0 and left[s] == 0:
                holder[s] = -1


def main() -> None:
    budgets = draw_budgets(512, 32, 512)  # bench --workload 512 --budgets 32-512
    passes = [math.ceil(b / TOKENS_PER_PASS) for b in budgets]
    longest = sorted(range(len(budgets)), key=lambda i: -budgets[i])
    print(f"512 budgets uniform in 32-512, {TOKENS_PER_PASS} tokens per row-pass")
    print("slots | run | group | passes | occupancy | refills | passes + refills")
    for size in (8, 16, 32, 64):
        for label, order in [("fixed, file order", list(range(512))), ("fixed, sorted", longest)]:
            p, occ, n = replay(passes, size, size, order)
            print(f"{size} | {label} | {size} | {p} | {occ:.3f} | {n} | {p + n}")
        for label, order in [("continuous, file order", list(range(512))), ("continuous, largest first", longest)]:
            for group in sorted({1, max(1, size // 16), max(1, size // 8), max(1, size // 4)}):
                p, occ, n = replay(passes, size, group, order)
                print(f"{size} | {label} | {group} | {p} | {occ:.3f} | {n} | {p + n}")


if __name__ == "__main__":
    main()
