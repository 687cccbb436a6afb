"""Task generators, scorers, held-out guarantees and the evaluation runner (mlxeff.tasks)."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import SHARED_DATA

from mlxeff.errors import MlxeffError
from mlxeff.generate import DecodeStrategy, PrefillStrategy
from mlxeff.tasks import TASKS, corpus, generators, get_task, runner, scoring, sets

DEFAULT = Path(__file__).resolve().parents[1] / "mlxeff" / "assets" / "default"

TRAIN_WORDS = ("apple river stone garden window basket kitten meadow thunder pepper lantern "
               "harbor pillow orchard blanket cottage kettle mountain ribbon saddle").split()
HELDOUT_WORDS = ("violet candle marble feather biscuit tunnel puzzle shadow velvet walnut "
                 "compass lemon sparrow button dragon pebble wagon blossom cinder anchor").split()


def prose(words, n, seed):
    """``n`` words of sentence-like text from ``words`` (hard-wrapped like a Gutenberg file)."""
    rng = np.random.default_rng(seed)
    out, line = [], []
    sentence = 0
    for _ in range(n):
        w = str(rng.choice(words))
        if sentence == 0:
            w = w.capitalize()
        sentence += 1
        if sentence > 6 and rng.random() < 0.2:
            w += rng.choice([".", ",", ";", "!"]) if sentence > 8 else ","
            sentence = 0 if w.endswith((".", "!")) else sentence
        line.append(w)
        if len(line) == 11:
            out.append(" ".join(line))
            line = []
    return "\n".join(out + [" ".join(line)]) + "\n"


PLANTED = prose(HELDOUT_WORDS, 80, seed=99)  # held-out-vocabulary text also put in a training book


def write_corpus(root: Path, planted: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        text = prose(TRAIN_WORDS, 15000, seed=i) + (PLANTED if planted and i == 1 else "")
        (root / f"train-0{i}.txt.gz").write_bytes(gzip.compress(text.encode()))
    # the held-out books: clean text around a long stretch of the planted passage repeated
    held = prose(HELDOUT_WORDS, 8000, seed=10) + PLANTED * 40 + prose(HELDOUT_WORDS, 8000, seed=11)
    (root / "valid.txt.gz").write_bytes(gzip.compress(held.encode()))
    return root


@pytest.fixture(scope="module")
def tok():
    from mlxeff.data import load_tokenizer

    return load_tokenizer(DEFAULT)


@pytest.fixture(scope="module")
def count(tok):
    return runner.token_counter(tok)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def heldout(corpus_dir):
    return corpus.load_split(corpus_dir, "heldout")


@pytest.fixture(scope="module")
def train(corpus_dir):
    return corpus.load_split(corpus_dir, "train")


def words_of(text):
    return set(re.findall(r"[a-z]+", text.lower()))


# ---------------------------------------------------------------------------------------------
# scorers


def test_normalize_and_matches():
    assert scoring.normalize('  "Hello,"  World!  ') == "hello world"
    assert scoring.normalize("The Beatles", drop_articles=True) == "beatles"
    assert scoring.exact_match(" lived.", ["lived"])
    assert scoring.exact_match('"ea9f581e"', ["ea9f581e"])
    assert not scoring.exact_match("lived happily", ["lived"])
    assert scoring.exact_match("the", ["The"])  # synthetic answers keep articles
    assert not scoring.exact_match("", ["the"])
    assert scoring.contains_match("It was Wilhelm Röntgen, in 1901", ["Wilhelm Röntgen"])
    assert scoring.contains_match("the Beatles did", ["The Beatles"], drop_articles=True)
    assert not scoring.contains_match("Beatlesque", ["Beatles"])  # whole words only
    assert not scoring.contains_match("anything", [""])


def test_token_accuracy():
    assert scoring.token_accuracy([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert scoring.token_accuracy([1, 9, 3], [1, 2, 3, 4]) == 0.5  # a missing token is wrong
    assert scoring.token_accuracy([1, 2, 3, 4, 5, 6], [1, 2, 3, 4]) == 1.0  # extra ignored
    assert scoring.token_accuracy([], [7]) == 0.0
    with pytest.raises(ValueError):
        scoring.token_accuracy([1], [])


def test_wilson_interval_known_values():
    lo, hi = scoring.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1.959964 ** 2 / (10 + 1.959964 ** 2), abs=1e-6)
    lo, hi = scoring.wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.236593, abs=1e-5), pytest.approx(0.763407, abs=1e-5))
    lo, hi = scoring.wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.722460, abs=1e-5)
    lo, hi = scoring.wilson_interval(160, 200)
    assert lo < 0.8 < hi and hi - lo == pytest.approx(0.1099, abs=1e-3)
    lo, hi = scoring.wilson_interval(9.5, 10)  # a mean over items (copy)
    assert 0.6 < lo < 0.95 < hi <= 1.0
    with pytest.raises(ValueError):
        scoring.wilson_interval(11, 10)


# ---------------------------------------------------------------------------------------------
# generators: determinism, formats, sizes


def test_generators_are_deterministic(heldout, count, corpus_dir):
    fresh = corpus.load_split(corpus_dir, "heldout")
    for a_split, b_split in ((heldout, fresh),):
        a = [generators.multidoc_qa(a_split, i, docs=3, context_tokens=300, count=count) for i in range(4)]
        b = [generators.multidoc_qa(b_split, i, docs=3, context_tokens=300, count=count) for i in range(4)]
        assert [x.__dict__ for x in a] == [x.__dict__ for x in b]
    # an item does not depend on which items come before it
    lone = generators.multidoc_qa(fresh, 3, docs=3, context_tokens=300, count=count)
    assert lone.__dict__ == a[3].__dict__
    other = generators.multidoc_qa(fresh, 3, docs=3, context_tokens=300, count=count, seed=1)
    assert other.prompt != lone.prompt
    c1 = generators.copy_task(heldout, 2, context_tokens=40, count=count)
    assert c1.__dict__ == generators.copy_task(fresh, 2, context_tokens=40, count=count).__dict__
    k1 = generators.kv_retrieval(7, pairs=5)
    assert k1.__dict__ == generators.kv_retrieval(7, pairs=5).__dict__
    assert generators.kv_retrieval(7, pairs=5, split="train").prompt != k1.prompt


def test_multidoc_item_is_answerable_from_exactly_one_passage(heldout, count):
    for i in range(6):
        item = generators.multidoc_qa(heldout, i, docs=4, context_tokens=400, count=count)
        passages = re.findall(r"^Passage \d+: (.*)$", item.prompt, flags=re.M)
        assert len(passages) == 4
        assert item.meta["gold_position"] == i % 4
        phrase = re.search(r'Which word follows "(.*)"\?\nAnswer:$', item.prompt).group(1)
        assert len(phrase.split()) == generators.PHRASE_WORDS
        hits = [p for p in passages if re.search(r"(?<![A-Za-z'])" + re.escape(phrase) + r"(?![A-Za-z'])", p, re.I)]
        assert hits == [passages[i % 4]]
        # the meta carries what the prompt was rendered from (the superposition benchmark reads it)
        assert item.meta["passages"] == passages and item.meta["question"] == generators.phrase_question(phrase)
        following = re.search(re.escape(phrase) + r" (\S+)", hits[0]).group(1)
        assert scoring.exact_match(following, item.answers)
        assert item.target == " " + item.answers[0]
        assert count(item.prompt) <= 400


def test_followups_leave_the_item_as_is_and_answer_correctly(heldout, count):
    for i in range(4):
        base = generators.multidoc_qa(heldout, i, docs=4, context_tokens=400, count=count)
        more = generators.multidoc_qa(heldout, i, docs=4, context_tokens=400, count=count, followups=5)
        assert (more.prompt, more.target, more.answers, more.meta) == (base.prompt, base.target,
                                                                      base.answers, base.meta)
        assert base.followups == [] and base.text() == base.prompt + base.target + "\n"
        assert 1 <= len(more.followups) <= 5 and more.text().startswith(base.text())
        passages = "\n".join(re.findall(r"^Passage \d+: (.*)$", more.prompt, flags=re.M))
        asked = {more.meta["phrase"].lower()}
        for line in more.followups:
            q = re.fullmatch(r'Question: Which word follows "(.*)"\?\nAnswer: (\S+)\n', line)
            assert q, line
            phrase, answer = q.groups()
            assert phrase.lower() not in asked
            asked.add(phrase.lower())
            hits = re.findall(r"(?<![A-Za-z'])" + re.escape(phrase) + r" (\S+)", passages, flags=re.I)
            assert len(hits) == 1 and scoring.exact_match(hits[0], [answer])
    kv = generators.kv_retrieval(3, pairs=6, split="train", followups=4)
    assert kv.prompt == generators.kv_retrieval(3, pairs=6, split="train").prompt
    pairs = dict(re.findall(r'"([0-9a-f]{8})": "([0-9a-f]{8})"', kv.prompt))
    asked = re.findall(r'Key: "([0-9a-f]{8})"\nCorresponding value: "([0-9a-f]{8})"\n', "".join(kv.followups))
    assert len(asked) == len(kv.followups) == 4
    assert all(pairs[k] == v for k, v in asked)
    assert len({k for k, _ in asked} | {kv.prompt.rsplit('Key: "', 1)[1][:8]}) == 5  # all different
    assert len(generators.kv_retrieval(3, pairs=3, split="train", followups=9).followups) == 2


def test_prompt_sizes_follow_context_tokens(heldout, count):
    for n in (250, 600):
        sizes = [count(generators.multidoc_qa(heldout, i, docs=3, context_tokens=n, count=count).prompt)
                 for i in range(3)]
        assert all(n - 40 <= s <= n for s in sizes)
    c = generators.copy_task(heldout, 0, context_tokens=50, count=count)
    assert 44 <= c.meta["passage_tokens"] <= 51 and c.prompt.startswith("Text: ")
    assert c.prompt.endswith("\nCopy:") and c.prompt[6:-6] == c.target[1:]

    r = generators.repeat_task(heldout, 0, context_tokens=60, count=count)
    assert 52 <= r.meta["passage_tokens"] <= 60


def test_repeat_item_is_the_passage_restarted_without_a_marker(heldout, train, count):
    for split in (heldout, train):
        seps = set()
        for i in range(12):
            r = generators.repeat_task(split, i, context_tokens=60, count=count)
            assert r == generators.repeat_task(split, i, context_tokens=60, count=count)
            whole = r.prompt + r.target
            sep = next(s for s in generators.REPEAT_SEPARATORS
                       for k in [(len(whole) - len(s)) // 2] if whole == whole[:k] + s + whole[:k])
            seps.add(sep)
            passage = whole[:(len(whole) - len(sep)) // 2]
            head = " ".join(passage.split(" ")[:generators.RESTART_WORDS])
            assert r.prompt == passage + sep + head and r.answers == [r.target.strip()]
        # held-out items restart with no separator (as token lists are concatenated); training
        # items vary it
        assert seps == {""} if split is heldout else len(seps) > 1


def test_kv_layout_matches_lost_in_the_middle():
    item = generators.kv_retrieval(3, pairs=4)
    lines = item.prompt.split("\n")
    assert lines[0].startswith("Extract the value corresponding to the specified key")
    assert lines[3].startswith('{"') and lines[6].endswith('"}')
    records = re.findall(r'"([0-9a-f]{8})": "([0-9a-f]{8})"', item.prompt)
    assert len(records) == 4 and len({k for k, _ in records}) == 4
    key = re.search(r'Key: "([0-9a-f]{8})"\nCorresponding value:$', item.prompt).group(1)
    assert dict(records)[key] == item.answers[0] and records[3][0] == key  # gold at 3 % 4
    assert item.target == f' "{item.answers[0]}"'


def test_bad_sizes_are_clear(heldout, count):
    with pytest.raises(MlxeffError, match="do not fit in --context-tokens 100"):
        generators.multidoc_qa(heldout, 0, docs=5, context_tokens=100, count=count)
    with pytest.raises(MlxeffError, match="need more text than the heldout books hold"):
        generators.multidoc_qa(heldout, 0, docs=80, context_tokens=80 * 200, count=count)
    with pytest.raises(MlxeffError, match="at least 1"):
        generators.kv_retrieval(0, pairs=0)
    with pytest.raises(MlxeffError, match="--seed"):
        generators.kv_retrieval(0, pairs=3, seed=-1)


# ---------------------------------------------------------------------------------------------
# held-out items never come from training books


def test_split_files(corpus_dir, tmp_path):
    assert [f.name for f in corpus.split_files(corpus_dir, "heldout")] == ["valid.txt.gz"]
    assert [f.name for f in corpus.split_files(corpus_dir, "train")] == ["train-00.txt.gz", "train-01.txt.gz"]
    (tmp_path / "valid.txt.gz").write_bytes(gzip.compress(b"text"))
    with pytest.raises(MlxeffError, match="train-"):
        corpus.load_split(tmp_path, "heldout")  # the overlap check needs the training books


def test_heldout_items_use_heldout_books_only(heldout, train, count):
    planted = corpus.normalize(PLANTED)
    for i in range(12):
        items = [generators.multidoc_qa(heldout, i, docs=3, context_tokens=300, count=count),
                 generators.copy_task(heldout, i, context_tokens=60, count=count)]
        for item in items:
            text = item.prompt.replace("Passage", "").replace("Question", "").replace("Which word follows", "")
            text = text.replace("Answer", "").replace("Text", "").replace("Copy", "")
            assert words_of(text) <= set(HELDOUT_WORDS), "held-out item uses training vocabulary"
            for p in re.findall(r"^(?:Passage \d+|Text): (.*)$", item.prompt, flags=re.M):
                assert p in heldout.text and p not in train.text
                assert not any(planted[k:k + 40] in p for k in range(0, len(planted) - 40, 20))
        t = generators.copy_task(train, i, context_tokens=60, count=count)
        assert words_of(t.target) <= set(TRAIN_WORDS)


def test_overlap_check_is_what_keeps_shared_text_out(corpus_dir, count):
    from mlxeff.data import read_text

    raw = read_text(corpus_dir / "valid.txt.gz")
    unchecked = corpus.BookSplit.from_texts("heldout", [raw])
    planted = corpus.normalize(PLANTED)[:60]
    hits = sum(planted[:30] in generators.copy_task(unchecked, i, context_tokens=200, count=count).target
               for i in range(30))
    assert hits > 0  # without the check, the planted (training) text is drawn
    checked = corpus.BookSplit.from_texts(
        "heldout", [raw], exclude=[read_text(f) for f in corpus.split_files(corpus_dir, "train")])
    assert all(planted[:30] not in generators.copy_task(checked, i, context_tokens=200, count=count).target
               for i in range(30))


def test_overlap_windows():
    from mlxeff.tasks import overlap

    a = "x" * 10 + "the quick brown fox jumps over the lazy dog near the quiet river bank " * 8
    keys = overlap.sampled_keys([a])
    shared = overlap.shared_windows("unrelated words " * 20 + a[30:400] + " tail" * 30, keys)
    assert shared.size > 0
    assert overlap.shared_windows("completely different text about other things " * 20, keys).size == 0
    s = int(shared[0])
    assert overlap.overlaps(shared, s, s + overlap.WIDTH) and not overlap.overlaps(shared, s + 1, s + overlap.WIDTH + 1)


def test_heldout_split_is_cached(corpus_dir, tmp_path):
    first = corpus.load_split(corpus_dir, "heldout", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("heldout-shared-*.npy"))) == 1
    second = corpus.load_split(corpus_dir, "heldout", cache_dir=tmp_path)
    assert np.array_equal(first.shared, second.shared) and first.shared.size > 0


# ---------------------------------------------------------------------------------------------
# the runner, through the engine with scripted hooks


class Script:
    """Engine hooks that replace the model: each prompt is answered with the next scripted text."""

    def __init__(self, tok, texts):
        self.tok, self.queue, self.prompts = tok, list(texts), 0
        self.pending = []
        vocab = len(tok._tokenizer.get_vocab()) if hasattr(tok, "_tokenizer") else 8192
        self.vocab = max(vocab, 8192)

    def _next(self):
        t = self.pending.pop(0) if self.pending else self.tok.eos_token_id
        return mx.array(np.eye(1, self.vocab, t, dtype=np.float32) * 50.0)

    def prefill(self):
        script = self

        class Prefill(PrefillStrategy):
            def make_cache(self, model):
                return []

            def __call__(self, model, prompt, cache):
                script.prompts += 1
                script.pending = list(script.tok.encode(script.queue.pop(0), add_special_tokens=False))
                return script._next()

        return Prefill()

    def decode(self):
        script = self

        class Decode(DecodeStrategy):
            def __call__(self, model, token, cache):
                return script._next()

        return Decode()


def run_scripted(tok, name, answers, **kw):
    items = runner.build_items(name, tok, **kw)
    script = Script(tok, answers(items))
    res = runner.evaluate_task(None, tok, name, hooks={"prefill": script.prefill(), "decode": script.decode()},
                               progress=False, **kw)
    assert script.prompts == len(items)
    return res


def test_runner_scores_scripted_answers(tok, corpus_dir):
    res = run_scripted(tok, "kv-retrieval", lambda items: [i.target + "\nmore" for i in items], docs=6, limit=6)
    assert res["accuracy"] == 1.0 and res["items"] == 6 and res["metric"] == "exact"
    assert res["ci95"][1] == pytest.approx(1.0) and res["interval"] == "Wilson score"
    assert res["by_position"] == {str(p): {"accuracy": 1.0, "items": 1} for p in range(1, 7)}
    assert res["samples"][0]["prediction"].strip(' "') == res["samples"][0]["answers"][0]
    res = run_scripted(tok, "kv-retrieval",
                       lambda items: [i.target if n % 3 else ' "0000"\n' for n, i in enumerate(items)],
                       docs=6, limit=6)
    assert res["correct"] == 4 and res["by_position"]["1"]["accuracy"] == 0.0
    res = run_scripted(tok, "multidoc-qa", lambda items: [i.target + "\n" for i in items], data=corpus_dir,
                       docs=3, context_tokens=300, limit=4)
    assert res["accuracy"] == 1.0 and 250 <= res["prompt_tokens"]["mean"] <= 300
    res = run_scripted(tok, "copy", lambda items: [i.target + "\n" for i in items], data=corpus_dir,
                       context_tokens=40, limit=3)
    assert res["accuracy"] == 1.0 and res["exact"] == 1.0 and res["metric"] == "token_accuracy"

    def one_wrong(items):  # the last word of each copy replaced
        return [tok.decode(tok.encode(i.target, add_special_tokens=False)[:-1]) + " xyzzy\n"
                for i in items]

    res = run_scripted(tok, "copy", one_wrong, data=corpus_dir, context_tokens=40, limit=2)
    assert 0.9 < res["accuracy"] < 1.0 and res["exact"] == 0.0


def test_runner_hooks_reach_the_engine(tok):
    """The same model scored with the engine's default strategies passed explicitly, and without."""
    from conftest import make_model, tiny_args

    model = make_model(tiny_args(vocab_size=8192), seed=3)
    calls = []

    class Counting(DecodeStrategy):
        def __call__(self, model, token, cache):
            calls.append(1)
            return super().__call__(model, token, cache)

    plain = runner.evaluate_task(model, tok, "kv-retrieval", docs=3, limit=2, progress=False)
    hooked = runner.evaluate_task(model, tok, "kv-retrieval", docs=3, limit=2, progress=False,
                                  hooks={"decode": Counting()})
    assert calls and {k: v for k, v in plain.items() if k != "settings"} == \
        {k: v for k, v in hooked.items() if k != "settings"}


def test_runner_option_errors(tok):
    with pytest.raises(MlxeffError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(MlxeffError, match="--docs does not apply to --task copy"):
        runner.check_options(TASKS["copy"], 3, None, None, {})
    with pytest.raises(MlxeffError, match="--context-tokens does not apply"):
        runner.check_options(TASKS["kv-retrieval"], None, 100, None, {})
    with pytest.raises(MlxeffError, match="technique options do not apply"):
        runner.check_options(TASKS["arc_easy"], None, None, None, {"decode": DecodeStrategy()})
    with pytest.raises(MlxeffError, match="needs --data"):
        runner.build_items("copy", tok)


# ---------------------------------------------------------------------------------------------
# published sets


EVAL = SHARED_DATA / "eval"
needs_sets = pytest.mark.skipif(not (EVAL / "kv75.jsonl.gz").is_file(),
                                reason="../shared/data/eval is absent (evaluation sets are not shipped)")


@needs_sets
def test_nq_items_put_the_gold_passage_among_distractors():
    items = sets.nq_items(EVAL / "nq-open-oracle.jsonl.gz", docs=4, limit=8)
    rows = sets.rows(EVAL / "nq-open-oracle.jsonl.gz")[:8]
    for i, (item, row) in enumerate(zip(items, rows)):
        passages = re.findall(r"^Passage \d+ \(.*?\): (.*)$", item.prompt, flags=re.M)
        assert len(passages) == 4 and item.meta["gold_position"] == i % 4
        assert passages[i % 4] == row["ctxs"][0]["text"]
        for j, p in enumerate(passages):
            if j != i % 4:
                assert not scoring.contains_match(p, row["answers"], drop_articles=True)
        assert item.prompt.endswith("?\nAnswer:") and item.answers == row["answers"]
    assert [x.prompt for x in sets.nq_items(EVAL / "nq-open-oracle.jsonl.gz", docs=4, limit=8)] == \
        [x.prompt for x in items]


@needs_sets
def test_kv75_subsets_keep_the_asked_pair():
    items = sets.kv75_items(EVAL / "kv75.jsonl.gz", docs=10, limit=5)
    for item in items:
        records = re.findall(r'"([0-9a-f-]{36})": "([0-9a-f-]{36})"', item.prompt)
        key = re.search(r'Key: "(.*)"', item.prompt).group(1)
        assert len(records) == 10 and records[item.meta["gold_position"]] == (key, item.answers[0])
    with pytest.raises(MlxeffError, match="--docs 76 is not between 1 and the 75"):
        sets.kv75_items(EVAL / "kv75.jsonl.gz", docs=76, limit=1)


# ---------------------------------------------------------------------------------------------
# benchmarks/copy_fidelity.py


def test_copy_fidelity_separates_teacher_forcing_from_generation(tok, corpus_dir):
    import importlib.util

    from conftest import make_model, tiny_args

    from mlxeff.generate import encode_prompt

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "copy_fidelity.py"
    spec = importlib.util.spec_from_file_location("copy_fidelity_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = make_model(tiny_args(vocab_size=8192))
    r = bench.run_task(model, tok, "copy", 2, 40, corpus_dir)
    assert r["items"] == 2 and len(r["records"]) == 2
    for item, rec in zip(runner.build_items("copy", tok, data=corpus_dir, context_tokens=40, limit=2),
                         r["records"]):
        prompt = encode_prompt(tok, item.prompt).reshape(-1).tolist()
        ref = tok.encode(item.target, add_special_tokens=False)
        logits = model(mx.array([prompt + ref[:-1]]))[0, len(prompt) - 1:]
        hits = np.array(mx.argmax(logits, axis=-1)) == np.array(ref)
        assert rec["teacher_forced_accuracy"] == pytest.approx(hits.mean())
        _, out, _ = runner.generate_line(model, tok, item.prompt, item.max_tokens)
        assert rec["generated_accuracy"] == pytest.approx(scoring.token_accuracy(out, ref))
        # a random model misses at once; cached decoding and a full forward choose alike (float32)
        assert rec["first_miss"] == next(i for i, (g, t) in enumerate(zip(out, ref)) if g != t)
        assert rec["full_forward_agrees"] is True
    assert r["exact_copies"] == 0 and r["misses_the_full_forward_agrees_with"] == 2


def test_lazyllm_kept_benchmark_finds_the_gold_tokens(tok, corpus_dir):
    """benchmarks/lazyllm_kept.py: with nothing pruned every token is kept and LazyLLM predicts
    what the plain prefill predicts; the located tokens are the phrase's and the answer's."""
    import importlib.util

    from conftest import make_model, tiny_args

    from mlxeff.techniques.lazyllm import LazySchedule

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lazyllm_kept.py"
    spec = importlib.util.spec_from_file_location("lazyllm_kept_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = make_model(tiny_args(vocab_size=8192))
    item = runner.build_items("multidoc-qa", tok, data=corpus_dir, docs=3, context_tokens=300, limit=1)[0]
    rec = bench.inspect_item(model, tok, item, LazySchedule(1.0, 1.0, stages=2))
    assert rec["phrase_kept"] and rec["answer_kept"] and rec["kept_fraction"] == 1.0
    assert rec["lazy_first_token_right"] == rec["plain_first_token_right"]
    offsets = tok._tokenizer(item.prompt, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    gold = item.meta["passages"][item.meta["gold_position"]]
    start = item.prompt.index(gold) + gold.index(item.meta["phrase"])
    a, b = offsets[bench.token_at(offsets, start + len(item.meta["phrase"]) + 1, 0)]
    assert item.prompt[a:b].strip() == tok.decode(tok.encode(item.target, add_special_tokens=False)[:1]).strip()
