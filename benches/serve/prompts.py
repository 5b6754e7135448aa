"""The fixed GSM8K-like questions both sides of benches/serve.sh ask (one user
message each, no system prompt: the chat template supplies its default).
Prompt i is QUESTIONS[i % len(QUESTIONS)].

FEWSHOT=N in the environment (0 to 8; default 0) puts the first N of
gsm8k_cot's chain-of-thought exemplars before it as user/assistant turns, and
every question in their "Q: ...\nA:" form: the prompts of `pipe run`'s
evaluate stage (8 exemplars: ~800-token prompts sharing a prefix)."""

import json
import os
import re

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. Her parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. How much more money does Betty need to buy the wallet?",
    "Julie is reading a 120-page book. Yesterday, she was able to read 12 pages and today, she read twice as many pages as yesterday. If she wants to read half of the remaining pages tomorrow, how many pages should she read?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
    "Mark has a garden with flowers. He planted plants of three different colors in it. Ten of them are yellow, and there are 80% more of those in purple. There are only 25% as many green flowers as there are yellow and purple flowers. How many flowers does Mark have in his garden?",
    "Albert is wondering how much pizza he can eat in one day. He buys 2 large pizzas and 2 small pizzas. A large pizza has 16 slices and a small pizza has 8 slices. If he eats it all, how many pieces does he eat that day?",
    "Ken created a care package to send to his brother. He placed a box on a scale, and then he poured into the box enough jelly beans to bring the weight to 2 pounds. Then, he added enough brownies to cause the weight to triple. How much did the box weigh at that point?",
    "Alexis is applying for a new job and bought a new set of business clothes to wear to the interview. She went to a department store with a budget of $200 and spent $30 on a button-up shirt and $46 on suit pants. How much money does she have left?",
    "Tina makes $18.00 an hour. If she works more than 8 hours per shift, she is eligible for overtime, which is paid by your hourly wage + 1/2 your hourly wage. If she works 10 hours every day for 5 days, how much money does she make?",
    "A deep-sea monster rises from the waters once every hundred years to feast on a ship. Over three hundred years, it has consumed 847 people. Ships have been built larger over time, so each new ship has twice as many people as the last ship. How many people were on the ship the monster ate in the first hundred years?",
    "Tobias is buying a new pair of shoes that costs $95. He has been saving up his money each month for the past three months. He gets a $5 allowance a month. He also mows lawns and shovels driveways. He charges $15 to mow a lawn and $7 to shovel. After buying the shoes, he has $15 in change. If he mows 4 lawns, how many driveways did he shovel?",
    "Randy has 60 mango trees on his farm. He also has 5 less than half as many coconut trees as mango trees. How many trees does Randy have in all on his farm?",
    "Jasper will serve charcuterie at his dinner party. He buys 2 pounds of cheddar cheese for $10, a pound of cream cheese that cost half the price of the cheddar cheese, and a pack of cold cuts that cost twice the price of the cheddar cheese. How much does he spend on the ingredients?",
    "Joy can read 8 pages of a book in 20 minutes. How many hours will it take her to read 120 pages?",
    "James creates a media empire. He creates a movie for $2000. Each DVD cost $6 to make. He sells it for 2.5 times that much. He sells 500 movies a day for 5 days a week. How much profit does he make in 20 weeks?",
]



def cot_exemplars():
    """gsm8k_cot's exemplars, read from pipe's own copy of them (the
    COT_EXEMPLARS array in stages/src/evaluate/gsm8k.rs): (question, answer)."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "stages", "src", "evaluate", "gsm8k.rs")
    text = open(src, encoding="utf-8").read()
    body = text[text.index("pub const COT_EXEMPLARS"):]
    body = body[: body.index("];")]
    lit = r'"((?:[^"\\]|\\.)*)"'
    pairs = [(json.loads(f'"{q}"'), json.loads(f'"{a}"')) for q, a in re.findall(lit + r",\s*" + lit, body)]
    assert len(pairs) == 8, f"{src}: {len(pairs)} exemplars found, not 8"
    return pairs


FEWSHOT = int(os.environ.get("FEWSHOT", "0"))


def question(i):
    return QUESTIONS[i % len(QUESTIONS)]


def messages(i):
    """Chat messages of prompt i (see FEWSHOT above)."""
    if not FEWSHOT:
        return [{"role": "user", "content": question(i)}]
    m = []
    for q, a in cot_exemplars()[:FEWSHOT]:
        m += [{"role": "user", "content": f"Q: {q}\nA:"}, {"role": "assistant", "content": a}]
    return m + [{"role": "user", "content": f"Q: {question(i)}\nA:"}]
