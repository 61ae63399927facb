"""net.fold(): the folded network equals the unfolded one in eval mode."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

import nnrt
import nnrt.fold
from nnrt.registry import registry

TOL = {"float32": 1e-6, "float64": 1e-12}


def _randomise_bn(net: nnrt.Sequential, rng: np.random.Generator) -> None:
    """Non-trivial gamma, beta and running statistics for every batchnorm."""
    state = net.state_dict()
    for key, value in state.items():
        if key.endswith(("gamma", "running_var")):
            state[key] = rng.uniform(0.5, 2.0, size=value.shape)
        elif key.endswith(("beta", "running_mean")):
            state[key] = rng.normal(scale=0.5, size=value.shape)
    net.load_state_dict(state)


def _names(net: nnrt.Sequential) -> list[str | None]:
    return [registry.name_of(type(layer)) for layer in net.layers]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_folded_network_matches_eval_network(dtype: str) -> None:
    rng = np.random.default_rng(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nnrt.BiasBeforeBatchNormWarning)
        net = nnrt.Sequential(
            [
                nnrt.layer("dense", 10, 16),  # with bias
                nnrt.layer("batchnorm", 16),
                nnrt.layer("sigmoid"),
                nnrt.layer("dense_nobias", 16, 8),
                nnrt.layer("batchnorm", 8, eps=1e-3),
                nnrt.layer("sigmoid"),
                nnrt.layer("dense", 8, 4),
            ],
            seed=2,
            dtype=dtype,
        )
    _randomise_bn(net, rng)
    X = rng.normal(size=(50, 10))
    before = net.state_dict()
    expected = net.predict(X)
    folded = net.fold()
    assert "batchnorm" not in _names(folded)
    assert _names(folded) == ["dense", "sigmoid", "dense", "sigmoid", "dense"]
    assert folded.dtype == np.dtype(dtype)
    got = folded.predict(X)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL[dtype])
    # the original network is untouched and shares no layers with the folded one
    after = net.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert not {id(a) for a in net.layers} & {id(b) for b in folded.layers}


def test_folded_weights_follow_the_formula() -> None:
    """W' = W * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps)."""
    rng = np.random.default_rng(4)
    net = nnrt.Sequential(
        [nnrt.layer("dense_nobias", 3, 5), nnrt.layer("batchnorm", 5, eps=0.01)],
        seed=0,
        dtype="float64",
    )
    _randomise_bn(net, rng)
    st = net.state_dict()
    s = st["1.gamma"] / np.sqrt(st["1.running_var"] + 0.01)
    folded = net.fold().state_dict()
    np.testing.assert_allclose(folded["0.weight"], st["0.weight"] * s, rtol=1e-14)
    np.testing.assert_allclose(
        folded["0.bias"], -st["1.running_mean"] * s + st["1.beta"], rtol=1e-14, atol=1e-15
    )


def test_batchnorm_not_after_dense_is_kept() -> None:
    rng = np.random.default_rng(5)
    net = nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 4, 6),
            nnrt.layer("sigmoid"),
            nnrt.layer("batchnorm", 6),
            nnrt.layer("dense", 6, 2),
        ],
        seed=0,
        dtype="float64",
    )
    _randomise_bn(net, rng)
    folded = net.fold()
    assert _names(folded) == ["dense_nobias", "sigmoid", "batchnorm", "dense"]
    X = rng.normal(size=(9, 4))
    np.testing.assert_allclose(folded.predict(X), net.predict(X), rtol=0, atol=1e-12)


def test_folding_a_trained_network_and_saving_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(6)
    X = rng.normal(size=(80, 5))
    y = (X[:, 0] > 0).astype(np.int64)
    net = nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 5, 8),
            nnrt.layer("batchnorm", 8),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 8, 2),
        ],
        seed=1,
    )
    net.fit(X, y, epochs=3, batch_size=16, progress=False)
    folded = net.fold()
    np.testing.assert_allclose(folded.predict(X), net.predict(X), rtol=0, atol=1e-6)
    folded.save(tmp_path / "folded.npz")
    again = nnrt.load(tmp_path / "folded.npz")
    assert np.array_equal(again.predict(X), folded.predict(X))


# ----------------------------------------------------------------- the fold hook
class Scale(nnrt.Layer):
    """Y = X * factor (a third-party layer for the hook tests)."""

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__()
        self.factor = float(factor)
        self.in_features = None
        self.out_features = None

    def forward(self, X, training=False):  # type: ignore[no-untyped-def]
        return np.asarray(X) * self.factor

    def backward(self, dY):  # type: ignore[no-untyped-def]
        return np.asarray(dY) * self.factor

    def config(self):  # type: ignore[no-untyped-def]
        return {"factor": self.factor}


_scale_plugin_names = itertools.count()


class ScalePlugin:
    """Registers ``test_scale`` and folds two adjacent scales into one."""

    def __init__(self, result=None) -> None:  # type: ignore[no-untyped-def]
        self.result = result  # None: the honest product; else returned as it is
        self.asked: list[tuple[str, str]] = []
        self.uid = next(_scale_plugin_names)

    @nnrt.hookimpl
    def nnrt_register_layers(self, register):  # type: ignore[no-untyped-def]
        register(f"test_scale_{self.uid}", Scale)

    @nnrt.hookimpl
    def nnrt_fold_pair(self, first, second):  # type: ignore[no-untyped-def]
        self.asked.append((type(first).__name__, type(second).__name__))
        if type(first) is not Scale or type(second) is not Scale:
            return None
        if self.result is not None:
            return first if self.result == "first" else self.result
        return Scale(first.factor * second.factor)


@pytest.fixture
def scale_plugin():  # type: ignore[no-untyped-def]
    plugins = []

    def make(result=None):  # type: ignore[no-untyped-def]
        plugin = ScalePlugin(result)
        # a counter, not id(plugin): a freed plugin's id can come back
        nnrt.register_plugin(plugin, name=f"fold-scale-{plugin.uid}")
        plugins.append(plugin)
        return plugin

    yield make
    for plugin in plugins:
        registry.pm.unregister(plugin)


def test_a_third_party_fold_chains_and_keeps_the_rest(scale_plugin) -> None:  # type: ignore[no-untyped-def]
    plugin = scale_plugin()
    net = nnrt.Sequential(
        [Scale(2.0), Scale(3.0), Scale(0.5), nnrt.layer("dense", 3, 2), Scale(4.0)],
        seed=0,
        dtype="float64",
    )
    X = np.random.default_rng(0).normal(size=(5, 3))
    folded = nnrt.fold.fold(net)
    # the three scales became one (2*3*0.5 = 3); dense and the last scale stay
    assert [type(layer).__name__ for layer in folded.layers] == ["Scale", "Dense", "Scale"]
    assert folded[0].factor == 3.0 and folded[2].factor == 4.0
    W, b = net.state_dict()["3.weight"], net.state_dict()["3.bias"]
    np.testing.assert_allclose(folded.predict(X), ((X * 3.0) @ W + b) * 4.0, rtol=1e-14)
    # every adjacent pair was offered, the merged scale with the next layer too
    assert ("Scale", "Scale") in plugin.asked and ("Scale", "Dense") in plugin.asked
    # the old names, kept by the batchnorm plugin, still work (deprecated)
    with pytest.warns(DeprecationWarning, match=r"net\.fold\(\)"):
        assert net.fold_batchnorm()[0].factor == 3.0
    with pytest.warns(DeprecationWarning, match="fold_batchnorm is deprecated"):
        assert nnrt.fold.fold_batchnorm(net)[0].factor == 3.0


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ("first", "one of the layers it was given"),
        (42, "int 42"),
        (nnrt.layer("dense", 3, 3), "in_features=3, expected 4"),
    ],
)
def test_a_bad_fold_result_is_a_plugin_error(scale_plugin, result, message) -> None:  # type: ignore[no-untyped-def]
    plugin = scale_plugin(result)
    name = registry.pm.get_name(plugin)
    net = nnrt.Sequential([nnrt.layer("dense", 4, 4), Scale(2.0), Scale(3.0)], seed=0)
    with pytest.raises(nnrt.PluginError, match="nnrt_fold_pair") as info:
        net.fold()
    assert name in str(info.value) and message in str(info.value)


def test_fold_takes_the_network_lock() -> None:
    import threading

    from nnrt._locks import holding

    net = nnrt.Sequential([nnrt.layer("dense_nobias", 3, 4), nnrt.layer("batchnorm", 4)], seed=0)
    done = threading.Event()
    with holding(net):
        t = threading.Thread(target=lambda: (net.fold(), done.set()))
        t.start()
        assert not done.wait(0.3)  # blocked while another thread holds the lock
    t.join(10)
    assert done.is_set()
