"""Text encoders (model=text_bag, text_cnn): pooling over real tokens only, checkpoints without the frozen table,
and what each MAML-family learner does with a frozen token table and with a trainable one kept out of its inner loop."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from algo_tasks import loader, make_trainer
from test_algo_functional import clone_with

from metalight.algorithms import ANIL, MAML, MAMLpp, MetaSGD, Reptile
from metalight.algorithms.optimization.functional import InnerLoop, inner_weights, make_task_fn, run_tasks, split_state
from metalight.errors import ConfigError
from metalight.runs.training import train
from metalight.text.encoders import TABLE, TextBag, TextCNN
from metalight.text.pretrained import PAD_ID, load_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
SGD1 = functools.partial(torch.optim.SGD, lr=1.0)


def token_batch(n_tasks: int, n_way: int = 3, k_shot: int = 2, k_query: int = 2, length: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Episodes of token ids [B, N*K, L], class-major labels: class c's utterances draw from tokens 10c+1..10c+10, random lengths, pads at the end."""
    generator = torch.Generator().manual_seed(seed)

    def utterances(shots: int) -> torch.Tensor:
        ids = torch.randint(1, 11, (n_tasks, n_way * shots, length), generator=generator) + 10 * torch.arange(n_way).repeat_interleave(shots).view(1, -1, 1)
        lengths = torch.randint(1, length + 1, (n_tasks, n_way * shots, 1), generator=generator)
        return ids.masked_fill(torch.arange(length) >= lengths, PAD_ID)

    def labels(shots: int) -> torch.Tensor:
        return torch.arange(n_way).repeat_interleave(shots).repeat(n_tasks, 1)

    return {"support_x": utterances(k_shot), "support_y": labels(k_shot), "query_x": utterances(k_query), "query_y": labels(k_query)}


def tiny_bag(seed: int = 0, **options) -> TextBag:
    """A bag of 4-d random embeddings (trainable unless frozen) and one hidden layer of 5, float64."""
    torch.manual_seed(seed)
    return TextBag(3, hidden=[5], **{"embeddings": "random", "embedding_dim": 4} | options).to(F64)


def test_bag_is_the_mean_of_the_real_tokens_rows():
    model = TextBag(3, hidden=[])
    table = load_embeddings()
    ids = torch.tensor([[5, 17, 900, 0, 0], [31999, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    expected = torch.stack([table[[5, 17, 900]].mean(0), table[31999], torch.zeros(256)])
    torch.testing.assert_close(model.features(ids), expected)


@pytest.mark.parametrize("encoder", [TextBag, TextCNN])
def test_pads_change_nothing(encoder):
    torch.manual_seed(0)
    model = encoder(3)
    ids = token_batch(1, length=7)["support_x"][0]
    longer = torch.cat([ids, torch.zeros(len(ids), 5, dtype=ids.dtype)], 1)
    torch.testing.assert_close(model(longer), model(ids))


def test_cnn_max_pools_each_width_over_the_windows_inside_the_utterance():
    torch.manual_seed(0)
    model = TextCNN(3, widths=[2, 4], filters=3)
    ids = torch.tensor([[7, 8, 9, 10, 11, 0], [7, 8, 0, 0, 0, 0]])
    table = model.features.embedding.weight
    rows = []
    for utterance in ids:
        tokens = table[utterance[utterance != PAD_ID]]  # the real tokens alone, [n, 256]
        pooled = []
        for width, conv in zip([2, 4], model.features.convs):
            padded = torch.cat([tokens, tokens.new_zeros(max(width - len(tokens), 0), tokens.shape[1])])
            windows = [conv.bias + (conv.weight * padded[t : t + width].T).sum((1, 2)) for t in range(len(padded) - width + 1)]
            pooled.append(torch.stack(windows).amax(0))
        rows.append(F.relu(torch.cat(pooled)))
    torch.testing.assert_close(model.features(ids), torch.stack(rows), rtol=1e-5, atol=1e-5)


def test_a_frozen_pretrained_table_stays_out_of_checkpoints():
    frozen, trained = TextBag(3), TextBag(3, embeddings="random")
    assert not frozen.features.embedding.weight.requires_grad and TABLE not in frozen.state_dict()
    assert trained.features.embedding.weight.requires_grad and TABLE in trained.state_dict()
    copy_ = TextBag(3)
    copy_.load_state_dict(frozen.state_dict())  # strict: the table comes back from the wheel
    ids = token_batch(1)["query_x"][0]
    torch.testing.assert_close(copy_(ids), frozen(ids))


def test_bad_options_name_the_key():
    with pytest.raises(ConfigError, match="model.embeddings='glove'"):
        TextBag(3, embeddings="glove")
    with pytest.raises(ConfigError, match="model.adapt_embeddings=true"):
        TextBag(3, adapt_embeddings=True)
    with pytest.raises(ConfigError, match="model.embedding_dim=64"):
        TextBag(3, embedding_dim=64)


def reference_gradient(model: TextBag, batch: dict, lr: float, steps: int, adapted: set[str]) -> dict[str, torch.Tensor]:
    """Second-order MAML written independently: a clone per task, autograd.grad on the `adapted` weights only, backward per task."""
    theta = dict(model.named_parameters())
    for p in theta.values():
        p.grad = None
    n_tasks = len(batch["support_x"])
    for i in range(n_tasks):
        fast = dict(theta)
        for _ in range(steps):
            loss = F.cross_entropy(clone_with(model, fast)(batch["support_x"][i]), batch["support_y"][i])
            names = [k for k in fast if k in adapted]
            grads = torch.autograd.grad(loss, [fast[k] for k in names], create_graph=True)
            fast = fast | {k: fast[k] - lr * g for k, g in zip(names, grads)}
        (F.cross_entropy(clone_with(model, fast)(batch["query_x"][i]), batch["query_y"][i]) / n_tasks).backward()
    grads = {k: p.grad.clone() for k, p in theta.items()}
    for p in theta.values():
        p.grad = None
    return grads


@pytest.mark.parametrize("adapt_embeddings", [False, True])
def test_maml_meta_gradient_with_a_trainable_table(adapt_embeddings):
    """adapt_embeddings=false: the inner loop leaves the table at its meta-value, which still gets the exact meta-gradient."""
    model = tiny_bag(adapt_embeddings=adapt_embeddings)
    theta = copy.deepcopy(model)
    batch = token_batch(2)
    maml = MAML(model, inner_lr=0.5, inner_steps=2, optimizer=SGD1)
    assert (TABLE in maml.adapted_weights) == adapt_embeddings
    params, fixed = split_state(model)
    adapted = run_tasks(make_task_fn(model, fixed, InnerLoop(2, 0.5), "loop", return_params=True, **maml.inner_options(False)), params, batch, None, "loop", False)
    moved = (adapted.params[TABLE] - params[TABLE].detach()).abs().amax()
    assert (moved > 1e-6) == adapt_embeddings

    make_trainer(max_steps=1, precision="64-true").fit(maml, loader([{k: v.clone() for k, v in batch.items()}]))
    names = {k for k in dict(theta.named_parameters())} - (set() if adapt_embeddings else {TABLE})
    expected = reference_gradient(theta, batch, lr=0.5, steps=2, adapted=names)
    assert expected[TABLE].abs().amax() > 1e-6  # the outer loop trains the table either way
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), dict(theta.named_parameters())[name].detach() - expected[name], rtol=1e-9, atol=1e-11)


LEARNERS = {
    "maml": lambda m: MAML(m, inner_lr=0.5, inner_steps=1, optimizer=SGD1),
    "fomaml": lambda m: MAML(m, inner_lr=0.5, inner_steps=1, first_order=True, optimizer=SGD1),
    "anil": lambda m: ANIL(m, inner_lr=0.5, inner_steps=1, optimizer=SGD1),
    "metasgd": lambda m: MetaSGD(m, inner_lr=0.5, inner_steps=1, optimizer=SGD1),
    "mamlpp": lambda m: MAMLpp(m, inner_lr=0.5, inner_steps=2, bnrs=False, bnwb=False, ca=False, msl=False, optimizer=SGD1),
    "reptile": lambda m: Reptile(m, inner_steps=2, inner_batch_size=None, eval_inner_steps=1),
    "reptile_loop": lambda m: Reptile(m, inner_steps=2, inner_batch_size=None, eval_inner_steps=1, task_parallel="loop"),  # carries its Adam task to task
}


@pytest.mark.parametrize("learner", sorted(LEARNERS))
@pytest.mark.parametrize("table", ["frozen", "trainable"])
def test_each_learner_keeps_the_table_out_of_its_inner_loop(learner, table):
    """Frozen: no learner adapts, steps or sizes it. Trainable but not adapted: out of every inner loop and of Meta-SGD's and
    MAML++'s step sizes; the outer step moves it for every learner but Reptile (whose meta-step theta - phi is 0 there)."""
    model = tiny_bag(freeze_embeddings=table == "frozen")
    algorithm = LEARNERS[learner](model)
    before = model.features.embedding.weight.detach().clone()
    adapted = algorithm.inner_options(training=False).get("adapted")
    assert adapted is not None and TABLE not in adapted and "features.mlp.0.weight" in inner_weights(model)
    sizes = algorithm.inner_options(training=False).get("step_sizes", {})
    assert TABLE not in sizes
    make_trainer(max_steps=1, precision="64-true").fit(algorithm, loader([token_batch(2)]))
    moved = not torch.equal(model.features.embedding.weight.detach(), before)
    assert moved == (table == "trainable" and not learner.startswith("reptile"))
    assert not torch.equal(model.features.mlp[0].weight.detach(), tiny_bag(freeze_embeddings=table == "frozen").features.mlp[0].weight)


def test_a_text_encoder_on_images_stops_in_one_line(tmp_path, data_dir, train_py_in_process):
    status, output = train_py_in_process(data_dir, tmp_path / "logs", "model=text_bag", "debug=fast_dev_run")
    assert status == 2, output[-2000:]
    assert "model=metalight.text.encoders.TextBag takes text, but the data (metalight.data.FewShotDataModule) gives images" in output
    assert "Traceback" not in output and not list(tmp_path.glob("logs/*/runs/*"))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model=conv4"], "model=metalight.models.Conv4 takes images, but the data (metalight.data.FewShotDataModule) gives text: use a text encoder"),
        (["model=text_bag", "algo=relationnet"], "algo=metalight.algorithms.RelationNet takes images only, but the data"),
        (["model=text_cnn", "algo=cnp"], "learns regression tasks only"),
        (["model=text_bag", "algo=protonet", "algo.finetune_steps=5"], "algo.finetune_steps fine-tunes on flipped and shifted copies"),
    ],
)
def test_an_image_model_or_learner_on_text_is_refused(compose_train, monkeypatch, overrides, expected):
    from metalight.data import FewShotDataModule
    from metalight.runs.config import validate_config

    monkeypatch.setattr(FewShotDataModule, "modality", "text")  # a text data module as far as the checks can tell
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        validate_config(compose_train(*overrides))
    validate_config(compose_train("model=text_bag", "algo=protonet"))


WORDS = ["card", "transfer", "weather", "alarm", "music", "recipe", "flight", "taxi"]
TEXT_LEARNERS = {
    "protonet": [], "matchingnet": ["algo.fce=true"], "maml": [], "fomaml": [], "anil": [], "metasgd": [],
    "mamlpp": ["algo.bnrs=false", "algo.bnwb=false", "algo.msl_epochs=1", "algo.da_epochs=0"],
    "reptile": ["algo.eval_inner_steps=2"], "baseline": ["algo.fit_epochs=2", "data.batch_size=4"],
    "baselinepp": ["algo.fit_epochs=2", "algo.head=cosine", "data.batch_size=4"],
    "snail": [],  # #34: (embedding, one-hot label) sequences of encoded utterances
}


@pytest.fixture(scope="module")
def intents_file(tmp_path_factory: pytest.TempPathFactory):
    """A JSONL of 8 intents x 6 utterances, each naming its intent's word."""
    path = tmp_path_factory.mktemp("text") / "intents.jsonl"
    rows = [{"text": f"my {word} question {j} {'please ' * (j % 3)}", "label": f"intent_{word}"} for word in WORDS for j in range(6)]
    path.write_text("".join(__import__("json").dumps(row) + "\n" for row in rows))
    return path


# text_cnn: a metric learner and an inner-loop one (its convolutions take the loop path) are enough
@pytest.mark.parametrize("model, learner", [("text_bag", learner) for learner in sorted(TEXT_LEARNERS)] + [("text_cnn", "protonet"), ("text_cnn", "maml")])
def test_every_classification_learner_runs_text_episodes(compose_train, intents_file, learner, model):
    """debug=fast_dev_run on data=text (4/2/2 intents): one training step (a flat batch for Baseline), one validation and one test batch."""
    algo = "baseline" if learner == "baselinepp" else learner
    cfg = compose_train(
        "data=text", f"model={model}", f"algo={algo}", "debug=fast_dev_run", "logger=csv", f"data.root={intents_file}",
        "data.n_way=2", "data.k_shot=1", "data.k_query=2", "data.meta_batch_size=2", "data.eval_batch_size=2",
        "data.source.ratios=[0.5,0.25,0.25]", *(["model.hidden=[8]"] if model == "text_bag" else ["model.filters=4"]), *TEXT_LEARNERS[learner],
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert 0.0 <= metrics["test/untrained_centroid_acc"] <= 1.0  # the baseline rides along on the same test batches


@pytest.mark.parametrize("distance", ["cos", "euclid"])
def test_centroid_accuracies_match_a_loop_over_queries(distance):
    from metalight.text.centroid import centroid_accuracies

    table = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    batch = token_batch(3, n_way=3, k_shot=2, k_query=3, seed=4)
    batch["support_x"] = batch["support_x"] % 50
    batch["query_x"] = (batch["query_x"] * 7) % 50  # queries far from their class's tokens: some are wrong
    expected = []
    for sx, sy, qx, qy in zip(batch["support_x"], batch["support_y"], batch["query_x"], batch["query_y"]):
        def embed(ids):
            real = ids[ids != PAD_ID]
            return table[real].mean(0) if len(real) else torch.zeros(6)
        support = torch.stack([embed(ids) for ids in sx])
        if distance == "cos":
            support = F.normalize(support, dim=-1)
        centroids = [support[sy == c].mean(0) for c in range(3)]
        right = 0
        for ids, label in zip(qx, qy):
            q = embed(ids)
            if distance == "cos":
                scores = [F.cosine_similarity(q, c, dim=0) for c in centroids]
            else:
                scores = [-(q - c).norm() for c in centroids]
            right += int(torch.stack(scores).argmax()) == int(label)
        expected.append(right / len(qy))
    actual = centroid_accuracies(table, batch, distance)
    assert 0 < min(expected) and max(expected) < 1 or len(set(expected)) > 1  # the case tells right from wrong
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64))


def test_untrained_protonet_on_the_mean_is_the_euclidean_centroid_baseline(compose_train, intents_file):
    """experiment=untrained_centroid (ProtoNets on the mean-pooled table, never trained) and the callback agree on the same test episodes."""
    cfg = compose_train(
        "experiment=untrained_centroid", "data=text", "logger=csv", f"data.root={intents_file}", "data.n_way=2", "data.k_shot=1",
        "data.k_query=2", "data.n_test_tasks=12", "data.eval_batch_size=5", "data.source.ratios=[0.5,0.25,0.25]", "trainer.accelerator=cpu",
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 0
    assert metrics["test/acc"] == pytest.approx(metrics["test/untrained_centroid_euclid_acc"], abs=1e-6)
    assert objects["algorithm"].test_results["untrained_centroid_acc"] == pytest.approx(metrics["test/untrained_centroid_acc"], abs=1e-6)


def test_a_residual_bag_starts_as_the_normalized_mean():
    """normalize + residual: before training, features are WordLlama's unit-length sentence embeddings (ProtoNets then start at the cosine baseline)."""
    model = TextBag(3, hidden=[64, 256], normalize=True, residual=True)
    ids = token_batch(1)["support_x"][0]
    table = load_embeddings()
    expected = torch.stack([F.normalize(table[row[row != PAD_ID]].mean(0), dim=0) for row in ids])
    torch.testing.assert_close(model.features(ids), expected)
    with pytest.raises(ConfigError, match="model.residual=true"):
        TextBag(3, hidden=[64], residual=True)


def test_an_image_network_on_text_data_stops_in_one_line(tmp_path, intents_file, train_py_in_process):
    status, output = train_py_in_process(tmp_path, tmp_path / "logs", "data=text", f"data.root={intents_file}", "model=conv4", "debug=fast_dev_run")
    assert status == 2, output[-2000:]
    assert "model=metalight.models.Conv4 takes images, but the data (metalight.text.datamodule.TextDataModule) gives text" in output
    assert "Traceback" not in output and not list(tmp_path.glob("logs/*/runs/*"))
