"""Synthetic Orca-Math-like word problems for benches/pack.sh.

    python3 gen_data.py --n 100000 --seed 0 --out data/train.jsonl

Writes one JSON object per line, {"question": ..., "answer": ...}, like
microsoft/orca-math-word-problems-200k: a grade-school word problem and a
step-by-step worked answer (prose, equations on their own lines, a final
"Therefore, ..." sentence). Deterministic for a given --n/--seed (Python's
`random` with a fixed seed; no third-party packages), so both sides of the
benchmark and every rerun see the same bytes.

With the seed's system prompt (benches/pack/system.txt, 288 tokens) and the
ChatML template a sample averages ~560 tokens with the SmolLM2 tokenizer
(question + answer ~260; 10th/90th percentiles ~415/665 tokens, a long tail of
arithmetic-series answers; ~0.3% of samples exceed 1024 tokens, so truncation
is exercised too). Ten problem families; 100k samples take ~2 s to write.
"""

import argparse
import json
import os
import random

NAMES = [
    "Yoongi", "Jungkook", "Yuna", "Seokjin", "Hoseok", "Jimin", "Taehyung", "Eunji", "Minyoung", "Namjoon",
    "Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis", "Tobias", "Marissa",
    "Priya", "Mateo", "Chloe", "Aarav", "Fatima", "Liam", "Sofia", "Noah", "Amara", "Diego",
    "Hannah", "Kofi", "Ingrid", "Ravi", "Mei", "Oliver", "Zara", "Lucas", "Nadia", "Ethan",
]
ITEMS = [
    ("apple", "apples"), ("pencil", "pencils"), ("notebook", "notebooks"), ("marble", "marbles"),
    ("cookie", "cookies"), ("ticket", "tickets"), ("book", "books"), ("shirt", "shirts"),
    ("cupcake", "cupcakes"), ("sticker", "stickers"), ("orange", "oranges"), ("toy car", "toy cars"),
    ("bottle of juice", "bottles of juice"), ("box of crayons", "boxes of crayons"), ("basketball", "basketballs"),
    ("loaf of bread", "loaves of bread"), ("flower pot", "flower pots"), ("comic book", "comic books"),
]
PLACES = ["the market", "a bookstore", "the school fair", "a bakery", "the toy shop", "a farm stand",
          "the stationery store", "an online shop", "the county fair", "a garage sale"]
VEHICLES = [("train", "km/h", "km"), ("car", "km/h", "km"), ("cyclist", "km/h", "km"), ("bus", "mph", "miles"),
            ("boat", "km/h", "km"), ("truck", "mph", "miles"), ("runner", "km/h", "km")]
UNITS = [("cm", "square centimeters"), ("m", "square meters"), ("inches", "square inches"), ("feet", "square feet")]

OPENERS = [
    "Let's solve this step by step.",
    "To solve this problem, we need to carefully translate the words into equations.",
    "Let's break the problem down into smaller parts.",
    "First, let's identify what we know and what we need to find.",
    "We can solve this problem by working through the information one piece at a time.",
    "Let's start by writing down the given values.",
]
FILLERS = [
    "It is a good idea to keep track of the units at every step, so that the final answer makes sense.",
    "Notice that we only need the values given in the problem; no extra assumptions are required.",
    "This is a common type of word problem, and the key is to set up the relationship correctly.",
    "We could also reason about this without equations, but writing them down makes each step easy to verify.",
    "Remember that the order of operations matters here: multiplication and division come before addition and subtraction.",
    "At this point it helps to pause and check that the intermediate result is reasonable.",
    "An alternative approach would be to work backwards from the final quantity, which gives the same result.",
    "Keeping the numbers organised in a small table can help avoid mistakes in problems like this one.",
]
CHECKS = [
    "Let's double-check the result by substituting it back into the original conditions.",
    "To verify, we can plug the value back into the problem statement.",
    "As a quick check, we can redo the calculation in a different order.",
]


def money(x):
    return f"${x:,.2f}"


class Gen:
    def __init__(self, seed):
        self.r = random.Random(seed)

    def pick(self, xs):
        return self.r.choice(xs)

    def maybe(self, p):
        return self.r.random() < p

    def fill(self, k_max=2, p=0.3):
        out = []
        for _ in range(k_max):
            if self.maybe(p):
                out.append(self.pick(FILLERS))
        return out

    # ------------------------------------------------------------ families
    def divided(self):
        n = self.pick(NAMES)
        d, q, s = self.r.randint(2, 19), self.r.randint(2, 60), self.r.randint(3, 40)
        x = d * q
        op = self.pick(["subtracting", "adding"])
        res = x - s if op == "subtracting" else x + s
        qtext = (f"A number divided by {d} is {q}. {n} got the result by {op} {s} "
                 f"{'from' if op == 'subtracting' else 'to'} a certain number. What is the result {n} got?")
        a = [self.pick(OPENERS),
             'Let\'s call the certain number "x". According to the problem, when x is divided by '
             f"{d}, the result is {q}. So we can write the equation:",
             f"x / {d} = {q}",
             f"To find x, we multiply both sides of the equation by {d}:",
             f"x = {q} * {d}\nx = {x}",
             *self.fill(),
             f"Now, {n} got the result by {op} {s} {'from' if op == 'subtracting' else 'to'} this number (x). So the result {n} got is:",
             f"Result = x {'-' if op == 'subtracting' else '+'} {s}\nResult = {x} {'-' if op == 'subtracting' else '+'} {s}\nResult = {res}"]
        if self.maybe(0.4):
            a += [self.pick(CHECKS), f"{x} / {d} = {q}, which matches the first condition, and {x} {'-' if op == 'subtracting' else '+'} {s} = {res}."]
        a.append(f"Therefore, the result {n} got is {res}.")
        return qtext, a

    def shopping(self):
        n = self.pick(NAMES)
        k = self.r.randint(2, 4)
        items = self.r.sample(ITEMS, k)
        qty = [self.r.randint(2, 15) for _ in items]
        price = [self.r.randint(25, 1500) / 100 for _ in items]
        paid = self.maybe(0.5)
        parts = [f"{q} {it[1]} at {money(p)} each" for q, it, p in zip(qty, items, price)]
        qtext = f"{n} went to {self.pick(PLACES)} and bought " + ", ".join(parts[:-1]) + f", and {parts[-1]}."
        total = sum(q * p for q, p in zip(qty, price))
        bill = None
        if paid:
            bill = (int(total // 50) + 1) * 50
            qtext += f" {n} paid with {money(bill)}. How much change did {n} receive?"
        else:
            qtext += f" How much did {n} spend in total?"
        a = [self.pick(OPENERS), f"To find the total cost, we calculate the cost of each type of item separately and then add them together."]
        for q, it, p in zip(qty, items, price):
            a.append(f"Cost of the {it[1]} = Number of {it[1]} * Price per {it[0]}\n"
                     f"Cost of the {it[1]} = {q} * {money(p)}\nCost of the {it[1]} = {money(q * p)}")
            if self.maybe(0.25):
                a.append(self.pick(FILLERS))
        a.append("Now, we add the costs together to get the total cost:")
        a.append("Total cost = " + " + ".join(money(q * p) for q, p in zip(qty, price)) + f"\nTotal cost = {money(total)}")
        if paid:
            a += [f"{n} paid with {money(bill)}, so the change is the amount paid minus the total cost:",
                  f"Change = {money(bill)} - {money(total)}\nChange = {money(bill - total)}",
                  f"Therefore, {n} received {money(bill - total)} in change."]
        else:
            a.append(f"Therefore, {n} spent {money(total)} in total.")
        return qtext, a

    def rectangle(self):
        u, sq = self.pick(UNITS)
        w = self.r.randint(3, 60)
        extra = self.r.randint(1, 30)
        l = w + extra
        p = 2 * (l + w)
        qtext = (f"The length of a rectangle is {extra} {u} more than its width. If the perimeter of the rectangle is "
                 f"{p} {u}, what is the area of the rectangle in {sq}?")
        a = [self.pick(OPENERS),
             f"Let's denote the width of the rectangle as w {u}. Then the length is w + {extra} {u}.",
             "The perimeter P of a rectangle is given by the formula:",
             "P = 2 * (length + width)",
             f"We know the perimeter is {p} {u}, so we can write:",
             f"{p} = 2 * ((w + {extra}) + w)\n{p} = 2 * (2w + {extra})\n{p} = 4w + {2 * extra}",
             f"Now, we solve for w:\n4w = {p} - {2 * extra}\n4w = {p - 2 * extra}\nw = {p - 2 * extra} / 4\nw = {w}",
             *self.fill(),
             f"So the width is {w} {u}, and the length is {w} + {extra} = {l} {u}.",
             "The area A of a rectangle is given by the formula:",
             "A = length * width",
             f"A = {l} * {w}\nA = {l * w}"]
        if self.maybe(0.4):
            a += [self.pick(CHECKS), f"2 * ({l} + {w}) = 2 * {l + w} = {p} {u}, which is the given perimeter."]
        a.append(f"Therefore, the area of the rectangle is {l * w} {sq}.")
        return qtext, a

    def speed(self):
        v, su, du = self.pick(VEHICLES)
        s1, s2 = self.r.randint(20, 120), self.r.randint(20, 120)
        t1, t2 = self.r.randint(1, 6), self.r.randint(1, 6)
        d1, d2 = s1 * t1, s2 * t2
        qtext = (f"A {v} travels at a speed of {s1} {su} for {t1} hours and then at {s2} {su} for {t2} hours. "
                 f"What is the total distance covered by the {v}, and what is its average speed for the whole journey?")
        avg = (d1 + d2) / (t1 + t2)
        a = [self.pick(OPENERS),
             "To find the total distance, we calculate the distance covered in each part of the journey using the formula:",
             "Distance = Speed * Time",
             f"For the first part of the journey:\nDistance_1 = {s1} {su} * {t1} hours = {d1} {du}",
             f"For the second part of the journey:\nDistance_2 = {s2} {su} * {t2} hours = {d2} {du}",
             *self.fill(),
             f"Total distance = Distance_1 + Distance_2\nTotal distance = {d1} {du} + {d2} {du}\nTotal distance = {d1 + d2} {du}",
             "The average speed is the total distance divided by the total time:",
             f"Total time = {t1} hours + {t2} hours = {t1 + t2} hours",
             f"Average speed = {d1 + d2} {du} / {t1 + t2} hours\nAverage speed = {avg:.2f} {su}",
             "Note that the average speed is not simply the average of the two speeds, because the "
             f"{v} spends a different amount of time at each speed." if t1 != t2 else
             "Because the two parts take the same time, the average speed equals the average of the two speeds.",
             f"Therefore, the {v} covers {d1 + d2} {du} in total, at an average speed of {avg:.2f} {su}."]
        return qtext, a

    def ages(self):
        n1, n2 = self.r.sample(NAMES, 2)
        a2 = self.r.randint(4, 40)
        diff = self.r.randint(2, 25)
        yrs = self.r.randint(2, 15)
        a1 = a2 + diff
        qtext = (f"{n1} is {diff} years older than {n2}. In {yrs} years, the sum of their ages will be "
                 f"{a1 + a2 + 2 * yrs}. How old is {n1} now?")
        s = a1 + a2 + 2 * yrs
        a = [self.pick(OPENERS),
             f"Let's denote {n2}'s current age as A. Then {n1}'s current age is A + {diff}.",
             f"In {yrs} years, {n2} will be A + {yrs} years old and {n1} will be A + {diff} + {yrs} = A + {diff + yrs} years old.",
             f"The sum of their ages in {yrs} years will be {s}, so we can write the equation:",
             f"(A + {yrs}) + (A + {diff + yrs}) = {s}",
             f"Combining like terms:\n2A + {diff + 2 * yrs} = {s}",
             f"Subtracting {diff + 2 * yrs} from both sides:\n2A = {s - diff - 2 * yrs}",
             f"Dividing both sides by 2:\nA = {a2}",
             *self.fill(),
             f"So {n2} is currently {a2} years old, and {n1} is {a2} + {diff} = {a1} years old."]
        if self.maybe(0.5):
            a += [self.pick(CHECKS),
                  f"In {yrs} years, {n1} will be {a1 + yrs} and {n2} will be {a2 + yrs}; {a1 + yrs} + {a2 + yrs} = {s}. Correct."]
        a.append(f"Therefore, {n1} is {a1} years old now.")
        return qtext, a

    def percent(self):
        n = self.pick(NAMES)
        base = self.r.randint(40, 2000)
        p1, p2 = self.r.randint(5, 60), self.r.randint(5, 40)
        it = self.pick(ITEMS)
        after1 = base * (100 - p1) / 100
        after2 = after1 * (100 + p2) / 100
        qtext = (f"{n} had {base} {it[1]}. {n} gave away {p1}% of them to friends, and later bought {p2}% more "
                 f"than the number that remained. How many {it[1]} does {n} have now? Round to the nearest whole number if necessary.")
        a = [self.pick(OPENERS),
             f"First, let's find out how many {it[1]} {n} gave away. {p1}% of {base} is:",
             f"{p1}/100 * {base} = {base * p1 / 100:g}",
             f"So the number of {it[1]} remaining is:\n{base} - {base * p1 / 100:g} = {after1:g}",
             *self.fill(),
             f"Next, {n} bought {p2}% more than the remaining amount. {p2}% of {after1:g} is:",
             f"{p2}/100 * {after1:g} = {after1 * p2 / 100:g}",
             f"Adding this to the remaining {it[1]}:\n{after1:g} + {after1 * p2 / 100:g} = {after2:g}"]
        if after2 != int(after2):
            a.append(f"Since we cannot have a fraction of a {it[0]}, we round {after2:g} to the nearest whole number, which is {round(after2)}.")
        a.append(f"Therefore, {n} has {round(after2)} {it[1]} now.")
        return qtext, a

    def average(self):
        k = self.r.randint(4, 9)
        xs = [self.r.randint(10, 999) for _ in range(k)]
        n = self.pick(NAMES)
        new = self.r.randint(10, 999)
        tot = sum(xs)
        qtext = (f"{n} recorded the following {k} numbers: " + ", ".join(map(str, xs)) +
                 f". If {n} adds the number {new} to the list, by how much does the average change?")
        a = [self.pick(OPENERS),
             "The average (arithmetic mean) of a list of numbers is the sum of the numbers divided by how many numbers there are.",
             "First, we find the sum of the original numbers:",
             "Sum = " + " + ".join(map(str, xs)) + f"\nSum = {tot}",
             f"The original average is:\nAverage_1 = {tot} / {k} = {tot / k:.4f}",
             *self.fill(),
             f"After adding {new}, there are {k + 1} numbers and the new sum is:\nSum_2 = {tot} + {new} = {tot + new}",
             f"The new average is:\nAverage_2 = {tot + new} / {k + 1} = {(tot + new) / (k + 1):.4f}",
             f"The change in the average is:\nAverage_2 - Average_1 = {(tot + new) / (k + 1):.4f} - {tot / k:.4f} = {(tot + new) / (k + 1) - tot / k:.4f}"]
        word = "increases" if (tot + new) / (k + 1) > tot / k else "decreases"
        a.append(f"Therefore, the average {word} by {abs((tot + new) / (k + 1) - tot / k):.4f}.")
        return qtext, a

    def series(self):
        # The long tail: a term-by-term table that can run past 1024 tokens.
        a0, d = self.r.randint(1, 50), self.r.randint(2, 17)
        k = self.r.randint(5, 16) if not self.maybe(0.05) else self.r.randint(45, 100)
        terms = [a0 + i * d for i in range(k)]
        qtext = (f"An arithmetic sequence starts with {a0} and each term is {d} more than the previous one. "
                 f"Find the sum of the first {k} terms, and list the terms to verify.")
        a = [self.pick(OPENERS),
             f"The terms of an arithmetic sequence are a_n = a_1 + (n - 1) * d, with a_1 = {a0} and d = {d}.",
             "Listing the terms one by one:"]
        a.append("\n".join(f"a_{i + 1} = {a0} + {i} * {d} = {t}" for i, t in enumerate(terms)))
        a += [*self.fill(),
              "The sum of the first n terms is S_n = n / 2 * (a_1 + a_n):",
              f"S_{k} = {k} / 2 * ({a0} + {terms[-1]})\nS_{k} = {k / 2:g} * {a0 + terms[-1]}\nS_{k} = {sum(terms)}",
              f"Therefore, the sum of the first {k} terms is {sum(terms)}."]
        return qtext, a

    def work(self):
        w1, d1 = self.r.randint(2, 12), self.r.randint(2, 20)
        w2 = self.r.randint(2, 24)
        job = self.pick(["paint a house", "build a wall", "harvest a field", "assemble 60 chairs", "pack 500 boxes"])
        qtext = (f"{w1} workers can {job} in {d1} days. Working at the same rate, how many days would it take "
                 f"{w2} workers to {job}?")
        total = w1 * d1
        a = [self.pick(OPENERS),
             "We assume that every worker works at the same constant rate, so the total amount of work can be measured in worker-days.",
             f"Total work = Number of workers * Number of days\nTotal work = {w1} * {d1} = {total} worker-days",
             *self.fill(),
             f"With {w2} workers, the number of days needed is the total work divided by the number of workers:",
             f"Days = {total} / {w2}\nDays = {total / w2:.2f}",
             f"Since more workers means less time, the answer should be {'less' if w2 > w1 else 'more'} than {d1} days, which it is."
             if w2 != w1 else "With the same number of workers, the time is unchanged, as expected.",
             f"Therefore, it would take {w2} workers {total / w2:.2f} days to {job}."]
        return qtext, a

    def compare(self):
        # Short ones, as Orca-Math has many ("Yoongi has 4, Jungkook has 6...").
        n1, n2, n3 = self.r.sample(NAMES, 3)
        it = self.pick(ITEMS)
        x, y = self.r.randint(2, 99), self.r.randint(2, 99)
        z = self.r.randint(1, 30)
        qtext = (f"{n1} has {x} {it[1]}, {n2} has {y} {it[1]}, and {n3} has {z} more {it[1]} than {n2}. "
                 f"Who has the most {it[1]}?")
        vals = {n1: x, n2: y, n3: y + z}
        best = max(vals, key=vals.get)
        a = [f"{n3} has {z} more {it[1]} than {n2}, so {n3} has {y} + {z} = {y + z} {it[1]}.",
             f"Comparing the three amounts: {n1} has {x}, {n2} has {y}, and {n3} has {y + z}."]
        a.append(f"Therefore, {best} has the most {it[1]}, with {vals[best]}.")
        return qtext, a

    def sample(self):
        fam = self.r.choices(
            [self.divided, self.shopping, self.rectangle, self.speed, self.ages, self.percent, self.average,
             self.series, self.work, self.compare],
            weights=[12, 12, 10, 10, 10, 10, 8, 6, 8, 30],
        )[0]
        q, a = fam()
        if self.maybe(0.3):
            q += " " + self.pick(["Show your work.", "Explain each step.", "Give the answer with units.",
                                  "What is the final answer?"])
        return {"question": q, "answer": "\n\n".join(a)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    g = Gen(args.seed)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(args.n):
            f.write(json.dumps(g.sample(), ensure_ascii=False) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
