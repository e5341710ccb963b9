"""Countdown task: solver, generator, arithmetic parser, rewards, eval parsers, files, end to end
(docs/tasks.md, "Countdown")."""

from __future__ import annotations

import collections
import itertools
import json
import random
import re
import time
import warnings
from fractions import Fraction
from pathlib import Path

import datasets
import pytest

from dllm_rl.errors import ConfigError
from dllm_rl.tasks import DataError, get_task
from dllm_rl.tasks import countdown as cd
from dllm_rl.tasks.arith import MAX_BITS, digit_runs, evaluate_reference, parse_expression
from dllm_rl.tasks.base import total_reward
from dllm_rl.tasks.rewards import REWARDS

# Small sizes keep generation well under a second.
SMALL = {"train_size": 1500, "validation_size": 100, "test_size": 100}
NUMS, TARGET = [30, 100, 93], 23
EXAMPLE = {"nums": NUMS, "target": TARGET}


def make_task(tmp_path: Path, **cfg) -> cd.CountdownTask:
    task = get_task("countdown", {**SMALL, **cfg}, tmp_path)
    assert isinstance(task, cd.CountdownTask)
    return task


def keys(ds: datasets.Dataset) -> set:
    return {cd.instance_key(n, t) for n, t in zip(ds["nums"], ds["target"], strict=True)}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- solver ----------------------------------------------------------------------------------------


def brute_force_values(nums: list[int]) -> set[Fraction]:
    """Every value reachable by repeatedly combining two of the remaining values (either order, any op)."""

    def combine(values: tuple[Fraction, ...]) -> set[Fraction]:
        if len(values) == 1:
            return {values[0]}
        out: set[Fraction] = set()
        for i, j in itertools.permutations(range(len(values)), 2):
            a, b = values[i], values[j]
            rest = tuple(v for k, v in enumerate(values) if k not in (i, j))
            results = [a + b, a - b, a * b] + ([a / b] if b != 0 else [])
            for r in results:
                out |= combine(rest + (r,))
        return out

    return combine(tuple(Fraction(n) for n in nums))


def test_solver_agrees_with_brute_force():
    rng = random.Random(0)
    for _ in range(80):
        nums = [rng.randint(0, 12) for _ in range(3)]
        reachable = brute_force_values(nums)
        for target in range(-15, 40):
            solutions = cd.solve(nums, target)
            assert bool(solutions) == (Fraction(target) in reachable), (nums, target)
            for text in solutions:
                parsed = parse_expression(text)
                assert parsed is not None and parsed.value == target, text
                assert sorted(parsed.literals) == sorted(nums), text


def test_tree_text_parses_to_the_tree_value():
    for nums in ([7, 3, 2], [4, 0, 5], [6, 6, 3]):
        for x, y, z in itertools.permutations(nums):
            for shape, o1, o2 in itertools.product((cd.LEFT, cd.RIGHT), cd.OPS, cd.OPS):
                tree = cd.Tree(x, y, z, shape, o1, o2)
                parsed = parse_expression(cd.tree_text(tree))
                value = cd.tree_value(tree)
                assert (parsed.value if parsed else None) == value, cd.tree_text(tree)
                if parsed:
                    assert parsed.literals == (x, y, z)


def test_classification_and_canonical_solution():
    assert cd.classify([1, 2, 3], 6) == "additive"
    assert cd.classify([3, 4, 5], 17) == "multiply"  # 3*4+5
    assert cd.classify([2, 8, 4], 1) == "divide"  # 8/(2*4)
    assert cd.classify([1, 1, 1], 100) == cd.UNSOLVABLE
    assert cd.analyse(NUMS, TARGET) == ("additive", "30-100+93")  # shortest, first in enumeration order
    assert cd.analyse([1, 1, 1], 100) == (cd.UNSOLVABLE, "")
    assert cd.solve([4, 0, 5], 0)  # zero and division by zero are handled
    assert len(cd.solving_trees([1, 1, 1], 1)) <= 192


# --- generator ---------------------------------------------------------------------------------------


def test_class_quotas_sum_and_round():
    assert cd.class_quotas(256, (0.895, 0.039, 0.066)) == {"additive": 229, "multiply": 10, "divide": 17}
    assert sum(cd.class_quotas(1001, (1, 1, 1)).values()) == 1001
    assert cd.class_quotas(10, (2, 0, 0)) == {"additive": 10, "multiply": 0, "divide": 0}


@pytest.fixture(scope="module")
def generated() -> dict[str, list[cd.Instance]]:
    return cd.generate_instances(cd.CountdownConfig(train_size=3000, validation_size=200, test_size=256))


def test_generated_instances_are_solvable_in_range_and_classified(generated):
    for split, rows in generated.items():
        for inst in rows:
            assert len(inst.nums) == 3 and all(1 <= n <= 100 for n in inst.nums)
            assert 1 <= inst.target <= 100
            assert cd.fixed_correct(inst.solution, inst.nums, inst.target), (split, inst)
            assert cd.classify(inst.nums, inst.target) == inst.category
            assert inst.solution == cd.analyse(inst.nums, inst.target)[1]


def test_class_mix_is_met(generated):
    # Quotas make the per-split mix exact (largest remainder); the test split matches the public file.
    assert collections.Counter(i.category for i in generated["test"]) == {"additive": 229, "multiply": 10, "divide": 17}
    train = collections.Counter(i.category for i in generated["train"])
    for category, share in zip(cd.CATEGORIES, (0.895, 0.039, 0.066), strict=True):
        assert abs(train[category] / 3000 - share) < 0.002


def test_generated_splits_are_deduplicated_and_disjoint(generated):
    split_keys = {s: [cd.instance_key(i.nums, i.target) for i in rows] for s, rows in generated.items()}
    for s, ks in split_keys.items():
        assert len(ks) == len(set(ks)), s
    assert not set(split_keys["test"]) & set(split_keys["train"])
    assert not set(split_keys["test"]) & set(split_keys["validation"])
    assert not set(split_keys["validation"]) & set(split_keys["train"])


def test_generator_is_deterministic_and_streams_are_independent(generated):
    again = cd.generate_instances(cd.CountdownConfig(train_size=3000, validation_size=200, test_size=256))
    assert again == generated
    other = cd.generate_instances(cd.CountdownConfig(train_size=500, validation_size=200, test_size=256))
    assert other["test"] == generated["test"]
    assert other["validation"] == generated["validation"]
    reseeded = cd.generate_instances(cd.CountdownConfig(seed=7, train_size=10, validation_size=10, test_size=50))
    assert reseeded["test"] != generated["test"][:50]


def test_generator_fails_clearly_when_the_mix_is_impossible():
    # With a single number value 1, no instance needs * (1*1 = 1 is also 1+1-1): the quota cannot be met.
    config = cd.CountdownConfig(number_min=1, number_max=1, class_mix=(0.0, 1.0, 0.0), test_size=5)
    with pytest.raises(ConfigError, match="class_mix"):
        cd.generate_instances(config)


# --- arithmetic parser ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,value",
    [
        ("30-(100-93)", 23),
        (" 1 + 2 * 3 ", 7),
        ("6/4", Fraction(3, 2)),
        ("8/3*3", 8),
        ("((2))", 2),
        ("3 \\times 4", 12),
        ("12 \\div 4", 3),
        ("2\\cdot 3", 6),
        ("3 × 4", 12),
        ("12 ÷ 4", 3),
        ("0+7", 7),
        ("123456", 123456),
        ("(1+\n2)*3", 9),
    ],
)
def test_strict_parser_valid(text, value):
    parsed = parse_expression(text)
    assert parsed is not None and parsed.value == value


@pytest.mark.parametrize(
    "text",
    ["-3+4", "3+-4", "+3", "2.5*2", "2.", ".5", "8/(3-3)", "05+1", "1 2", "2(3)", "()", "", "   ", "2**3", "2//3",
     "1234567", "3=3", "x+1", "٣+1", "1+", "(1", "1)", "1\x002"],
)  # fmt: skip
def test_strict_parser_rejects(text):
    assert parse_expression(text) is None


def test_strict_parser_literals_in_order():
    assert parse_expression("3+(1*2)").literals == (3, 1, 2)


def test_parser_limits():
    assert parse_expression("(" * 20 + "1" + ")" * 20).value == 1
    assert parse_expression("(" * 21 + "1" + ")" * 21) is None
    assert parse_expression("1+" * 99 + "1").value == 100  # 199 characters
    assert parse_expression("1+" * 100 + "1") is None  # 201 characters
    factor = 999_999  # just under 2**20: 12 factors fit in MAX_BITS, 14 do not
    assert MAX_BITS == 256
    assert parse_expression("*".join([str(factor)] * 12)).value == factor**12
    assert parse_expression("*".join([str(factor)] * 14)) is None
    start = time.perf_counter()
    assert parse_expression("(" * 10_000 + "1" + ")" * 10_000) is None
    assert evaluate_reference("(" * 10_000 + "1" + ")" * 10_000) is None
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize(
    "text,value",
    [
        ("2**-1", Fraction(1, 2)),
        ("-2**2", -4),
        ("2**3**2", 512),
        ("7//2", 3),
        ("-7//2", -4),
        ("1.5*2", 3),
        (".5+.5", 1),
        ("2.", 2),
        ("00", 0),
        ("05.5", Fraction(11, 2)),
        ("(1+\n2)", 3),
        ("1\f+2", 3),
        ("--1", 1),
        ("1-+1", 0),
        ("1**999999", 1),
        ("2*-3", -6),
    ],
)
def test_reference_evaluator_follows_python(text, value):
    assert evaluate_reference(text) == value


@pytest.mark.parametrize(
    "text",
    ["05", "1+\n2", "1\v+2", "()", "2(3)", "9**9**9", "10**100000", "(-8)**(1/3)", "1/0", "0**-1", "1..2",
     "3 \\times 4"],
)  # fmt: skip
def test_reference_evaluator_rejects(text):
    assert evaluate_reference(text) is None


def python_eval_oracle(text: str) -> Fraction | None:
    """Python's own evaluation, as d1 runs it, for the differential test below (inputs without ** only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = eval(text, {"__builtins__": None}, {})  # noqa: S307  (test oracle on generated strings)
    except Exception:
        return None
    return Fraction(value) if isinstance(value, (int, float)) else None


def test_reference_evaluator_matches_python_eval_on_random_strings():
    rng = random.Random(1)
    alphabet = "0123456789+-*/(). \n"
    checked = 0
    for _ in range(6000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
        if "**" in text or any(len(run) > 6 for run in re.findall(r"\d+", text)):
            continue  # powers can hang eval; long literals are outside our documented limit
        ours, python = evaluate_reference(text), python_eval_oracle(text.strip())
        assert (ours is None) == (python is None), repr(text)
        if ours is not None:
            assert abs(ours - python) <= Fraction(1, 10**9) * max(1, abs(python)), repr(text)
        checked += python is not None
    assert checked > 300  # the sample really exercises valid expressions


def test_digit_runs_are_lexical():
    assert digit_runs("2.5*(30-7)") == [2, 5, 30, 7]
    assert digit_runs("1" * 50) == [-1]  # too long to be a task number, not converted


# --- reward functions -----------------------------------------------------------------------------------


def chat(answer: str) -> str:
    return f"<reasoning>\nworking\n</reasoning>\n<answer>\n{answer}\n</answer>"


@pytest.mark.parametrize(
    "completion,value",
    [
        (chat("30-(100-93)"), 1.0),
        (chat("30 - 100 + 93"), 1.0),
        (chat("30 \\times 1") + chat("(100-93) \\times 30 \\div 30"), 0.1),  # last answer: wrong numbers
        ("<answer>1+1</answer> then <answer>30-(100-93)</answer>", 1.0),
        ("<answer>30-(100-93)</answer> then <answer>oops</answer>", 0.1),
        ("<answer>a<answer>30-(100-93)</answer>", 1.0),  # innermost last pair
        (chat("30-(100-93)=23"), 0.1),
        (chat("30+100-93"), 0.1),
        (chat("100-93+30-14"), 0.1),
        (chat("-70+93"), 0.1),
        (chat(""), 0.1),
        ("30-(100-93)", 0.0),
        ("<answer>30-(100-93)", 0.0),
    ],
)
def test_fixed_reward_chat(completion, value):
    assert cd.countdown_reward(completion, **EXAMPLE, answer_tags=True) == value


@pytest.mark.parametrize(
    "completion,nums,target,value",
    [
        (chat("30-(100-93)"), NUMS, TARGET, 1.0),
        (chat("2.5*2"), [2, 5, 2], 5, 1.0),  # lexical number check: "2.5" counts as 2 and 5
        (chat("-30+100+93"), NUMS, 163, 1.0),  # unary minus
        (chat("2**3*1"), [2, 3, 1], 8, 1.0),  # power
        (chat("1/3*3"), [1, 3, 3], 1, 1.0),
        ("<answer>a<answer>30-(100-93)</answer>", NUMS, TARGET, 0.1),  # the regex's match is "a<answer>30-(..."
        (chat("30 \\times 1"), [30, 1, 5], 30, 0.1),  # no operator normalisation in the reference reward
        (chat("30-(100-93)=23"), NUMS, TARGET, 0.1),
        (chat(""), NUMS, TARGET, 0.1),
        ("30-(100-93)", NUMS, TARGET, 0.0),
    ],
)
def test_reference_reward_chat(completion, nums, target, value):
    assert cd.countdown_reference_reward(completion, nums=nums, target=target, answer_tags=True) == value


def test_fixed_rejects_what_only_the_reference_accepts():
    for completion, nums, target in [(chat("2.5*2"), [2, 5, 2], 5), (chat("-30+100+93"), NUMS, 163)]:
        assert cd.countdown_reward(completion, nums=nums, target=target, answer_tags=True) == 0.1


@pytest.mark.parametrize("fn", [cd.countdown_reward, cd.countdown_reference_reward])
@pytest.mark.parametrize(
    "completion,value",
    [("30-(100-93)", 1.0), ("30-100+93", 1.0), ("30+100", 0.1), ("30-(100-93)=23", 0.1), ("", 0.0), ("  \n", 0.0)],
)
def test_rewards_compact(fn, completion, value):
    assert fn(completion, **EXAMPLE) == value


def test_registered_rewards_declare_their_range():
    for name in ("countdown", "countdown_reference"):
        spec = REWARDS[name]
        assert (spec.low, spec.high) == (0.0, 1.0)
        assert spec.fn("30-(100-93)", **spec.example) == 1.0


# --- eval parsers -----------------------------------------------------------------------------------------

EOT = "<|eot_id|><|endoftext|><|endoftext|>"


@pytest.mark.parametrize(
    "generation,nums,target,reference,fixed",
    [
        ("reasoning</reasoning>\n<answer>\n\\boxed{30-(100-93)}\n</answer>" + EOT, NUMS, TARGET, True, True),
        ("\\boxed{30 - (100 - 93) = 23}", NUMS, TARGET, True, True),  # "= target" rescue
        ("\\boxed{4 \\times 5 - 3}", [4, 5, 3], 17, True, True),
        ("\\boxed{8 \\div (2 \\times 4)}", [8, 2, 4], 1, True, True),
        ("\\boxed{4 × 5 - 3}", [4, 5, 3], 17, False, True),  # only the fixed parser normalises ×
        ("<answer>30-(100-93)</answer>", NUMS, TARGET, False, True),  # reference scores the whole text
        ("30-(100-93)", NUMS, TARGET, True, False),  # ... and a bare generation; fixed needs box or tags
        ("<answer>30-(100-93)</answer> \\boxed{", NUMS, TARGET, True, True),  # unterminated box
        ("\\boxed{1+1} then \\boxed{30-(100-93)}", NUMS, TARGET, True, True),  # last box
        ("\\boxed{30-(100-93)} then \\boxed{1+1}", NUMS, TARGET, False, False),
        ("\\boxed 30-(100-93)$ ok", NUMS, TARGET, True, False),  # "\boxed " form of the reference only
        ("\\boxed{2.5*2}", [2, 5, 2], 5, True, False),
        ("\\boxed{30+100-93}", NUMS, TARGET, False, False),
        ("", NUMS, TARGET, False, False),
    ],
)
def test_eval_parsers(generation, nums, target, reference, fixed):
    assert cd.reference_correct(cd.reference_eval_equation(generation), nums, target) == reference
    equation = cd.fixed_eval_equation(generation)
    assert (equation is not None and cd.fixed_correct(equation, nums, target)) == fixed


def test_equals_rescue_takes_the_first_expression_before_an_equals():
    assert cd.equals_rescue("so 30 - (100 - 93) = 23") == "30 - (100 - 93)"
    assert cd.equals_rescue("a=b, 3+4 = 7, 1=2") == "3+4"
    assert cd.equals_rescue("3+4 =") is None
    assert cd.equals_rescue("1+" * 20_000) is None  # linear, where the regex would be quadratic


# A transcription of d1's reward and eval parser (docs/tasks.md, "Countdown") with Python's regex and eval, as an
# oracle for our eval-free reproduction. Only ever fed strings without "**".
_ALLOWED = re.compile(r"^[\d+\-*/().\s]+$")


def d1_equation_correct(equation: str, nums: list[int], target: int) -> bool:
    if sorted(int(n) for n in re.findall(r"\d+", equation)) != sorted(nums) or not _ALLOWED.match(equation):
        return False
    value = python_eval_oracle(equation.strip())
    return value is not None and abs(value - target) < Fraction(1, 10**5)


def d1_reward(text: str, nums: list[int], target: int) -> float:
    matches = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if not matches:
        return 0.0
    return 1.0 if d1_equation_correct(matches[-1].strip(), nums, target) else 0.1


def d1_boxed(text: str) -> str:
    """last_boxed_only_string + remove_boxed of d1's eval; raises TypeError where d1's would raise."""
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    start = start if start >= 0 else text.rfind("\\fbox")
    if start < 0:
        return text
    depth = 0
    for k in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if text[k] == "}" and depth == 0:
            box = text[start : k + 1]
            return box[7:-1] if box.startswith("\\boxed{") else box
    raise TypeError("no closing brace")


def d1_eval_correct(text: str, nums: list[int], target: int) -> bool:
    try:
        equation = d1_boxed(text)
    except TypeError:
        match = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
        equation = match.group(1).strip() if match else text
    equation = equation.replace("\\div", "/").replace("\\times", "*").replace("\\cdot", "*")
    rescue = re.search(r"([0-9+\-*/() ]+)=[0-9. ]+", equation)
    return d1_equation_correct(rescue.group(1).strip() if rescue else equation, nums, target)


def random_completion(rng: random.Random, nums: list[int]) -> str:
    noise = ["+", "-", "*", "/", "(", ")", " ", ".", "\n", "=", "23", "٣", "\u00a0", "\\times", "\\div", "x"]
    if rng.random() < 0.5:  # a solution of [3, 5, 8] -> 23 or 16, perturbed a little
        expression = rng.choice(["3*5+8", "8+5*3", "(5-3)*8", "3+5+8", "8 * (5 - 3)", "-3+5*8-...", "5*3+8.0"])
        for _ in range(rng.choice([0, 0, 1])):
            k = rng.randrange(len(expression) + 1)
            expression = expression[:k] + rng.choice(noise) + expression[k:]
    else:
        expression = ""
        for piece in (str(n) for n in rng.sample(nums, 3)):
            expression += "".join(rng.choice(noise) for _ in range(rng.choice([0, 1, 1, 2]))) + piece
            expression += rng.choice(["+", "-", "*", "/", "", " - "])
        expression = expression.rstrip("+-*/ ") if rng.random() < 0.8 else expression
    if rng.random() < 0.3:
        expression = f"({expression})"
    wrappers = [
        "<answer>{}</answer>",
        "<answer>\n{}\n</answer>",
        "\\boxed{{{}}}",
        "<answer>\\boxed{{{}}}</answer>",
        "{}",
        "<answer>{}",
        "\\boxed {}$",
        "<answer>1</answer><answer>{}</answer>",
        "\\boxed{{{}}} = 23",
    ]
    text = rng.choice(wrappers).format(expression)
    while "**" in text:
        text = text.replace("**", "*")
    return text


def test_reference_reward_and_eval_match_d1_on_random_completions():
    rng = random.Random(2)
    nums, target = [3, 5, 8], 23  # 3*5+8, 8*3-5+... several shapes reach 23
    agree_correct = 0
    for _ in range(3000):
        text = random_completion(rng, nums)
        assert "**" not in text
        for t in (target, 16):
            reward = cd.countdown_reference_reward(text, nums=nums, target=t, answer_tags=True)
            assert reward == d1_reward(text, nums, t), repr(text)
            ours = cd.reference_correct(cd.reference_eval_equation(text), nums, t)
            assert ours == d1_eval_correct(text, nums, t), repr(text)
            agree_correct += ours
    assert agree_correct > 50  # the sample holds correct answers too, not only failures


# --- metrics -----------------------------------------------------------------------------------------------


def test_metrics_compact_and_chat(tmp_path):
    examples = [EXAMPLE, {"nums": [4, 5, 3], "target": 17}]
    compact = make_task(tmp_path)
    assert compact.primary_metric == "acc"
    assert compact.metrics(["30-(100-93)", "4*5+3"], examples) == {"acc": 0.5, "parsable": 1.0}
    assert compact.metrics(["30-(100-93)", "4*5-3"], examples) == {"acc": 1.0, "parsable": 1.0}
    chat_task = make_task(tmp_path, prompt_style="chat")
    generations = ["<answer>\n\\boxed{30-(100-93)}\n</answer>" + EOT, "<answer>4*5-3</answer>"]
    assert chat_task.metrics(generations, examples) == {"acc": 0.5, "acc_reference": 0.5, "acc_fixed": 1.0}
    with pytest.raises(ValueError):
        chat_task.metrics(["x"], examples)


# --- adversarial completions ---------------------------------------------------------------------------

ADVERSARIAL = [
    "9**9**9",
    "10**100000",
    "1" * 1_000_000,
    "(" * 10_000 + "1" + ")" * 10_000,
    "__import__('os').system('echo pwned')",
    "٣+٣+٣",
    "<answer>" + "1+" * 5000,
    "<answer>" * 10_000,
    "\\boxed{" + "{" * 20_000,
    "",
    "\x00" * 1000,
    "<answer>\x00</answer>",
    "1+" * 20_000 + "=1",
]


def adversarial_variants() -> list[str]:
    out = []
    for text in ADVERSARIAL:
        out += [text, f"<answer>{text}</answer>", f"<answer>\\boxed{{{text}}}</answer>", f"\\boxed {text}$"]
    return out


@pytest.mark.parametrize("name", sorted(n for n in REWARDS if n.startswith("countdown")))
def test_countdown_rewards_survive_adversarial_completions(name):
    spec = REWARDS[name]
    for text in adversarial_variants():
        for answer_tags in (False, True):
            start = time.perf_counter()
            value = spec.fn(text, **spec.example, answer_tags=answer_tags)
            assert spec.low <= value <= spec.high
            assert time.perf_counter() - start < 0.5, (name, text[:40])
    assert spec.fn(None, **spec.example) == 0.0  # a non-string is no expression


def test_metrics_survive_adversarial_completions(tmp_path):
    texts = adversarial_variants()
    for style in ("compact", "chat"):
        task = make_task(tmp_path, prompt_style=style)
        start = time.perf_counter()
        values = task.metrics(texts, [EXAMPLE] * len(texts))
        assert time.perf_counter() - start < 2.0
        assert all(0.0 <= v <= 1.0 for v in values.values())


# --- files and hub -------------------------------------------------------------------------------------


def test_files_in_both_shapes(tmp_path):
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [{"nums": [30, 100, 93], "target": 23}]  # also a test instance: must leave train
        + [{"nums": [i, 2, 3], "target": i + 5} for i in range(1, 40)]
        + [{"nums": [1, 1, 1], "target": 100}],  # unsolvable: kept
    )
    test_rows = [{"input": "30,100,93", "output": "23"}, {"input": "4,5,3", "output": "17"}]
    test = write_jsonl(tmp_path / "test.jsonl", test_rows)
    task = make_task(tmp_path, train_file=str(train), test_file=str(test), validation_size=5)
    test_ds, val, train_ds = (task.dataset(s) for s in ("test", "validation", "train"))
    assert list(test_ds["nums"]) == [[30, 100, 93], [4, 5, 3]] and list(test_ds["target"]) == [23, 17]
    assert list(test_ds["category"]) == ["additive", "multiply"]
    assert len(val) == 5
    assert len(train_ds) == 41 - 5 - 1  # carved validation, test instance dropped
    assert not keys(test_ds) & keys(train_ds) and not keys(val) & keys(train_ds)
    unsolvable = [r for r in itertools.chain(train_ds, val) if r["nums"] == [1, 1, 1]]
    assert unsolvable and unsolvable[0]["solution"] == "" and unsolvable[0]["category"] == cd.UNSOLVABLE
    # Cached by content: an edited file is read again.
    write_jsonl(test, test_rows + [{"input": "1,2,3", "output": "6"}])
    assert len(make_task(tmp_path, train_file=str(train), test_file=str(test), validation_size=5).dataset("test")) == 3
    # The test-file shape is accepted for training data and nums/target for the test file.
    swapped = make_task(tmp_path, train_file=str(test), test_file=str(train), validation_size=1)
    assert len(swapped.dataset("test")) == 41


def test_carved_validation_is_disjoint_even_with_duplicate_rows(tmp_path):
    rows = [{"nums": [i % 7 + 1, 2, 3], "target": i % 7 + 6} for i in range(60)]  # 7 distinct instances
    task = make_task(tmp_path, train_file=str(write_jsonl(tmp_path / "dup.jsonl", rows)), validation_size=10)
    assert not keys(task.dataset("validation")) & keys(task.dataset("train"))


@pytest.mark.parametrize(
    "bad_row,message",
    [
        ({"nums": [1, 2], "target": 3}, "expected 3 numbers"),
        ({"nums": [1, 2.5, 3], "target": 3}, "integers"),
        ({"nums": [1, -2, 3], "target": 3}, "integers"),
        ({"nums": [1, 2, 3]}, "target missing"),
        ({"nums": [1, 2, 3], "target": -4}, "target"),
    ],
)
def test_malformed_row_names_file_and_row(tmp_path, bad_row, message):
    path = write_jsonl(tmp_path / "broken.jsonl", [{"nums": [1, 2, 3], "target": 6}] * 2 + [bad_row])
    task = make_task(tmp_path, train_file=str(path), validation_size=1)
    with pytest.raises(DataError, match=message) as info:
        task.dataset("train")
    assert "broken.jsonl" in str(info.value) and "row 3" in str(info.value)


def test_malformed_test_file_row(tmp_path):
    rows = [{"input": "1,2,3", "output": "6"}, {"input": "1,2,3", "output": "6"}, {"input": "1,2,x", "output": "6"}]
    task = make_task(tmp_path, test_file=str(write_jsonl(tmp_path / "cd3.jsonl", rows)))
    with pytest.raises(DataError, match=r"cd3\.jsonl.*row 3"):
        task.dataset("test")


def test_missing_file_fails_at_construction(tmp_path):
    with pytest.raises(DataError, match="task.validation_file"):
        make_task(tmp_path, validation_file=str(tmp_path / "nope.jsonl"))


def test_hub_training_data_is_filtered_to_three_numbers(tmp_path, monkeypatch):
    rows = {"nums": [[1, 2, 3], [1, 2, 3, 4], [5, 6, 7], [2, 2, 9], [8, 8, 8, 8]], "target": [6, 10, 18, 13, 32]}
    calls = []

    def fake_hub(hub_id, config, split, field):
        calls.append((hub_id, config, split, field))
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(cd, "load_hub", fake_hub)
    task = make_task(tmp_path, train_hub_id="Jiayi-Pan/Countdown-Tasks-3to4", validation_size=1)
    train, val = task.dataset("train"), task.dataset("validation")
    assert calls == [("Jiayi-Pan/Countdown-Tasks-3to4", None, "train", "task.train_file")]
    assert len(train) + len(val) == 3 and all(len(n) == 3 for n in list(train["nums"]) + list(val["nums"]))


# --- task end to end -------------------------------------------------------------------------------------

SPEC_TRAIN_PROMPT = (
    "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n\n"
    "Using only the numbers [30, 100, 93], create an arithmetic expression that evaluates to exactly 23. You must "
    "use all numbers from the list, and each number must be used exactly once. You may use the operations +, -, *, "
    "and / as needed. After reasoning, provide only your final expression inside <answer></answer> tags without "
    "including an equals sign or the target number. For example, if the numbers are [2, 3, 4] and the target is 5, "
    "a valid answer is: <answer>\n2*4-3\n</answer>"
)
SPEC_EVAL_PROMPT = (
    "Using only the provided numbers, create an arithmetic expression that evaluates to exactly the provided target "
    "number. You may use the operations +, -, *, and / as needed, but each number must be used exactly once. Think "
    "step-by-step. After reasoning, provide only your final expression inside \\boxed{} tags without including an "
    "equals sign or the target number. For example: \\boxed{a + b * c}Respond in the following format:\n"
    "<reasoning>\nYour reasoning here\n</reasoning>\n<answer>\n\\boxed{...}\n</answer>\n\nNumbers: [30, 100, 93]\n"
    "Target: 23"
)


def test_prompts_verbatim():
    assert cd.compact_prompt(NUMS, TARGET) == "30,100,93:23"
    assert cd.chat_train_prompt(NUMS, TARGET) == SPEC_TRAIN_PROMPT
    assert cd.chat_eval_prompt(NUMS, TARGET) == SPEC_EVAL_PROMPT


@pytest.mark.parametrize("style", ["compact", "chat"])
def test_get_task_end_to_end(tmp_path, style):
    task = make_task(tmp_path, prompt_style=style)
    for split, size in (("train", 1500), ("validation", 100), ("test", 100)):
        ds = task.dataset(split)
        assert len(ds) == size
        assert {"prompt", "eval_prompt", "nums", "target", "solution"} <= set(ds.column_names)
        for row in ds.select(range(20)):
            for prompt in (row["prompt"], row["eval_prompt"]):
                assert not any(ord(ch) < 32 and ch != "\n" for ch in prompt)
            reference = task.target(row)
            assert total_reward(task.reward(reference, row)) == 1.0
            if style == "compact":
                assert row["prompt"] == row["eval_prompt"] == cd.compact_prompt(row["nums"], row["target"])
                assert set(row["prompt"] + reference) <= set(task.alphabet)
                assert len(reference) <= task.config.completion_length
            else:
                assert row["prompt"] == cd.chat_train_prompt(row["nums"], row["target"])
                assert "\\boxed{}" in row["eval_prompt"]
    again = make_task(tmp_path, prompt_style=style)  # served from the cache: identical data
    assert list(again.dataset("test")["prompt"]) == list(task.dataset("test")["prompt"])
    assert any(p.name.startswith("countdown-") for p in (tmp_path / "data").iterdir())


def test_reward_modes_and_named_rewards(tmp_path):
    row = make_task(tmp_path, prompt_style="chat").dataset("test")[0]
    unary = "<answer>-" + "+".join(str(n) for n in row["nums"]) + "</answer>"
    fixed = make_task(tmp_path, prompt_style="chat")
    reference = make_task(tmp_path, prompt_style="chat", reward_mode="reference")
    assert [name for name, _ in fixed.reward_fns] == ["countdown"]
    assert [name for name, _ in reference.reward_fns] == ["countdown_reference"]
    good = f"<answer>{row['solution']}</answer>"
    assert fixed.reward(good, row) == {"countdown": 1.0}
    assert reference.reward(good, row) == {"countdown_reference": 1.0}
    assert fixed.reward(unary, row) == {"countdown": 0.1}
    # A reward named in task.rewards reads the answer region from the row's answer_tags column.
    named = make_task(tmp_path, prompt_style="chat", rewards=["countdown"])
    assert named.reward(good, row) == {"countdown": 1.0}
    with pytest.raises(ConfigError, match="task.reward_mode"):
        make_task(tmp_path, reward_mode="sloppy")


@pytest.mark.parametrize(
    "cfg,field",
    [
        ({"class_mix": [0.5, 0.5]}, "task.class_mix"),
        ({"class_mix": [1, -1, 1]}, "task.class_mix"),
        ({"number_min": 5, "number_max": 4}, "task.number_min"),
        ({"number_max": 100_000}, "task.number_max"),  # 5-digit numbers do not fit 16 compact characters
        ({"prompt_style": "poem"}, "task.prompt_style"),
    ],
)
def test_config_errors(tmp_path, cfg, field):
    with pytest.raises(ConfigError, match=field):
        make_task(tmp_path, **cfg)


@pytest.mark.parametrize(
    "style,lengths,rollout", [("compact", [16], (16, 16, 8)), ("chat", [128, 256, 512], (256, 32, 128))]
)
def test_hydra_config_resolves_style_dependent_lengths(tmp_path, style, lengths, rollout):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["task=countdown", f"task.prompt_style={style}"])
    assert list(cfg.task.eval_gen_lengths) == lengths
    assert (cfg.sampler.gen_length, cfg.sampler.block_length, cfg.sampler.steps) == rollout
    assert (cfg.task.eval_subset_size, cfg.task.eval_subset_seed) == (256, 42)
    task = get_task("countdown", {**cfg.task, **SMALL}, tmp_path)  # the composed keys are all understood
    assert task.prompt_style == style and task.config.class_mix == (0.895, 0.039, 0.066)
