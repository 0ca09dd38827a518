"""algo=baseline: the heads fitted per task (deterministic, they separate what is separable), pretraining, and bad input."""


import pytest
import torch
from algo_tasks import make_batch, make_trainer, tiny_conv4

from metalight.algorithms import Baseline
from metalight.algorithms.baselines.heads import FitRecipe, fit_heads, fit_logistic
from metalight.algorithms.optimization.reptile import task_generator
from metalight.errors import ConfigError
from metalight.runs.training import build, train
from synthetic_data import write_folder

N_WAY, SHOTS, QUERIES, DIM = 4, 3, 5, 6


def separable(tasks: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Support and query embeddings of N_WAY well separated clusters (one per class, a random direction each) per task."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(tasks, N_WAY, DIM, generator=generator) * 4

    def points(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(N_WAY).repeat_interleave(per_class).repeat(tasks, 1)
        noise = 0.1 * torch.randn(tasks, N_WAY * per_class, DIM, generator=generator)
        return torch.gather(centers, 1, labels.unsqueeze(-1).expand(-1, -1, DIM)) + noise, labels

    (zs, ys), (zq, yq) = points(SHOTS), points(QUERIES)
    return zs, ys, zq, yq


def accuracies(logits: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
    """[B, P] accuracy of logits [B, P, Q, N]."""
    return (logits.argmax(-1) == query_y.unsqueeze(1)).float().mean(-1)


def generators(seed: int, tasks: int = 3) -> list[torch.Generator]:
    return [task_generator(seed, "test", 0, task) for task in range(tasks)]


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_sgd_heads_separate_separable_embeddings_and_learn_by_steps(head):
    zs, ys, zq, yq = separable()
    accs = accuracies(fit_heads(head, zs, ys, zq, N_WAY, FitRecipe(), generators(0)), yq)
    assert accs.shape == (3, FitRecipe().epochs + 1)
    assert (accs[:, -1] == 1).all(), accs[:, -1]
    assert (accs[:, 0] < 1).any(), "the untrained head already separated them: the test cannot tell fitting from luck"


def test_logistic_head_separates_separable_embeddings():
    zs, ys, zq, yq = separable()
    logits = fit_logistic(zs, ys, zq)
    assert logits.shape == (3, 1, N_WAY * QUERIES, N_WAY)
    assert (accuracies(logits, yq) == 1).all()
    shuffled = fit_logistic(zs, ys[:, torch.randperm(ys.shape[1], generator=torch.Generator().manual_seed(0))], zq)
    assert (accuracies(shuffled, yq) < 1).all(), "it scored 100% on shuffled support labels too"


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_fitted_head_is_a_function_of_the_seed_and_task_alone(head):
    zs, ys, zq, _ = separable()
    recipe = FitRecipe(epochs=3)
    first = fit_heads(head, zs, ys, zq, N_WAY, recipe, generators(7))
    assert torch.equal(first, fit_heads(head, zs, ys, zq, N_WAY, recipe, generators(7)))
    assert not torch.equal(first, fit_heads(head, zs, ys, zq, N_WAY, recipe, generators(8)))
    alone = fit_heads(head, zs[1:2], ys[1:2], zq[1:2], N_WAY, recipe, generators(7)[1:2])  # task 1 without its batch mates
    torch.testing.assert_close(alone[0], first[1])


@pytest.mark.parametrize("head", ["linear", "cosine", "logistic"])
def test_pretraining_steps_and_evaluation_through_lightning(head, one_thread):
    """A few steps on labelled images move body and classifier; evaluation scores every task at every recorded step."""
    algorithm = Baseline(tiny_conv4(n_way=3), head=head, num_classes=5, fit_epochs=2, seed=0)
    start = {k: v.clone() for k, v in algorithm.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    images = [{"x": torch.randn(6, 1, 8, 8, generator=generator), "y": torch.randint(0, 5, (6,), generator=generator)} for _ in range(3)]
    trainer = make_trainer(max_steps=3)
    trainer.fit(algorithm, torch.utils.data.DataLoader(images, batch_size=None))
    moved = {k for k, v in algorithm.state_dict().items() if not torch.equal(start[k], v)}
    assert any(k.startswith("classifier.") for k in moved) and any(k.startswith("model.features.") for k in moved)
    outcome = algorithm.evaluate_tasks(make_batch(2, n_way=3), "val", [0, 1], keep_logits=True)
    points = 1 if head == "logistic" else 3
    assert outcome.scores.shape == (2, points) and outcome.logits.shape == (2, points, 6, 3) and outcome.loss.shape == (2,)


def test_logits_features_are_the_l2_normalized_pretraining_logits(one_thread):
    """algo.features=logits (RFS's use_logit=True): the logistic head is fitted on L2-normalized classifier outputs, by hand."""
    from sklearn.linear_model import LogisticRegression

    batch = make_batch(2, n_way=3, k_shot=2, k_query=3, seed=1)
    # batch statistics (each task's images normalized together, here and by hand): fresh running statistics would
    # shrink every embedding to nearly the same point and both classifiers to chance
    on_logits = Baseline(tiny_conv4(n_way=3, hidden=16), head="logistic", num_classes=7, features="logits").eval()
    on_embedding = Baseline(tiny_conv4(n_way=3, hidden=16), head="logistic", num_classes=7).eval()
    with torch.no_grad():
        on_logits.classifier.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))  # pretraining moves it from 0
    on_embedding.load_state_dict(on_logits.state_dict())  # the same body and classifier
    assert on_embedding.features == "embedding"  # Chen et al.'s, the default
    support, query = on_logits.embed_tasks(batch)
    assert support.shape == (2, 6, 7) and query.shape == (2, 9, 7)  # one feature per training class
    got = on_logits.evaluate_tasks(batch, "test", [0, 1], keep_logits=True).logits
    weight, bias = on_logits.classifier.weight.detach().double(), on_logits.classifier.bias.detach().double()
    for task in range(2):
        with torch.no_grad():
            embedding = on_logits.model.features(torch.cat([batch["support_x"][task], batch["query_x"][task]])).double()
        logits = embedding @ weight.T + bias
        logits = logits / logits.pow(2).sum(dim=1, keepdim=True).sqrt()
        classifier = LogisticRegression(random_state=0, solver="lbfgs", max_iter=1000).fit(logits[:6].numpy(), batch["support_y"][task].numpy())
        expected = torch.from_numpy(classifier.predict_log_proba(logits[6:].numpy())).float()
        torch.testing.assert_close(got[task, 0], expected, rtol=0, atol=1e-3)
    from_embedding = on_embedding.evaluate_tasks(batch, "test", [0, 1], keep_logits=True).logits
    assert (from_embedding - got).abs().max() > 0.05, "the embedding and the logits gave the same classifier: the test cannot tell them apart"


def test_rfs_protocols_read_the_logits_and_chen_et_als_the_embedding(compose_train):
    for experiment in ("rfs_miniimagenet_5w1s", "rfs_tiered_imagenet_5w5s", "rfs_cifar_fs_5w1s", "rfs_fc100_5w5s"):
        assert compose_train(f"experiment={experiment}").algo.features == "logits", experiment
    for experiment in ("baseline_miniimagenet_5w1s", "baselinepp_miniimagenet_5w5s", "quick_omniglot_baseline"):
        assert compose_train(f"experiment={experiment}").algo.features == "embedding", experiment
    with pytest.raises(ConfigError, match=r"algo.features='pooled' is not known: use embedding .* or logits"):
        build(compose_train("algo=baseline", "algo.features=pooled"))


def test_an_unknown_head_is_one_clear_error(compose_train):
    with pytest.raises(ConfigError, match=r"algo.head='svm' is not known: use linear \(Baseline\), cosine \(Baseline\+\+\) or logistic"):
        build(compose_train("algo=baseline", "algo.head=svm"))


def test_no_training_classes_is_one_line_exit_status_2_and_nothing_written(tmp_path, train_py_in_process):
    root = write_folder(tmp_path / "images", {"a": 3, "b": 3, "c": 3})
    for part, names in (("train", "a"), ("val", "b"), ("test", "c")):
        (root / f"{part}.txt").write_text(names + "\n")
    status, output = train_py_in_process(
        tmp_path, tmp_path / "logs", "algo=baseline", "data=folder", f"data.root={root}", "data.split=lists",
        "model=conv4_strided", "data.n_way=1", "data.num_workers=0", "data.persistent_workers=false", "data.image_size=8",
    )
    assert status == 2, output[-2000:]
    assert "data.train_mode=flat (algo=baseline) pretrains a classifier over the training classes, but the train split" in output
    assert "Traceback" not in output and len([line for line in output.splitlines() if "Error" in line]) == 1
    assert not list(tmp_path.glob("logs/*/runs/*")), "the stopped run left its folder behind"


def test_a_baseline_step_through_the_configs_moves_a_timm_body(compose_train, one_thread):
    overrides = ["algo=baseline", "model=timm", "model.name=test_efficientnet", "debug=fast_dev_run", "logger=csv",
                 "data.batch_size=4", "data.eval_batch_size=2", "algo.fit_epochs=2"]
    before = {k: v.clone() for k, v in build(compose_train(*overrides))["algorithm"].model.features.state_dict().items()}
    metrics, objects = train(compose_train(*overrides))
    body = objects["algorithm"].model.features
    assert objects["trainer"].global_step == 1 and 0.0 <= metrics["test/acc"] <= 1.0 and "test/acc_step2" in metrics
    assert type(body).__module__.startswith("timm.")
    assert any(k.endswith("weight") and not torch.equal(v, before[k]) for k, v in body.state_dict().items() if v.is_floating_point())
