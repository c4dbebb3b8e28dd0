"""Config decoding, checks, line numbers, schema, TOML output and core pinning."""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpipeline import config
from mpipeline.config import ConfigError, ConfigIssue, PipelineConfig
from mpipeline.config import _commented as _config_commented
from mpipeline.config import _toml as _config_toml

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "config" / "pipeline.toml"
EXAMPLES = sorted((ROOT / "config" / "examples").glob("*.toml"))
MIB = 1 << 20
# The real probes, kept before the autouse fixture replaces them.
REAL_AVAILABLE_CPUS = config._available_cpus
REAL_FREE_SHM = config._free_shm_bytes


@pytest.fixture(autouse=True)
def machine(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A 4-core machine with 1 GiB of free /dev/shm, whatever runs the tests."""
    monkeypatch.setattr(config, "_available_cpus", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(config, "_free_shm_bytes", lambda: 1 << 30)
    yield


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def issues_of(tmp_path: Path, text: str) -> list[tuple[int | None, str, str]]:
    return [(i.line, i.field, i.message) for i in config.validate(write(tmp_path, text))]


def only_issue(tmp_path: Path, text: str) -> tuple[int | None, str, str]:
    found = issues_of(tmp_path, text)
    assert len(found) == 1, found
    return found[0]


# The shipped files


def test_default_file_is_the_defaults() -> None:
    assert config.validate(DEFAULT) == []
    assert config.load(DEFAULT) == PipelineConfig()


def test_default_file_writes_out_every_field() -> None:
    text = DEFAULT.read_text()
    written = set(_config_toml.key_lines(text))
    # Fields whose default is "unset" cannot be written in TOML; they are shown commented.
    written |= {"gateway.auth_token_env", "stages.rag.documents", "stages.stream.sink_jsonl"}
    written.add("gateway.admin_token_env")
    written.add("stages.rag.index_dir")
    written |= {
        f"stages.inference.{table}.{name}"
        for table in ("openai", "anthropic")
        for name in ("max_tokens", "temperature")
    }
    written.add("stages.inference.llama_cpp.chat_format")
    assert "# auth_token_env =" in text and "# documents =" in text and "# sink_jsonl =" in text
    assert set(field_paths(PipelineConfig)) <= written


def field_paths(cls: type[msgspec.Struct], prefix: str = "") -> Iterator[str]:
    for f in msgspec.structs.fields(cls):
        if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct):
            yield from field_paths(f.type, prefix + f.name + ".")
        else:
            yield prefix + f.name


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    assert config.validate(path) == []


def test_examples_do_what_they_say() -> None:
    one = config.load(ROOT / "config/examples/one-core.toml")
    assert set(map(tuple, config.pinning(one).values())) == {(0,)}
    assert one.stages.inference.replicas == 1
    assert any("share" in w for w in config.warnings(one))
    many = config.load(ROOT / "config/examples/many-shards.toml")
    assert many.stages.inference.replicas == 8 and many.stages.inference.cpus == "auto"
    shed = config.load(ROOT / "config/examples/block-vs-shed.toml")
    assert shed.stages.inference.full_policy == "shed"
    assert shed.stages.assemble.full_policy == "block"


def test_decoding_with_msgspec_directly_agrees() -> None:
    cfg = msgspec.toml.decode(DEFAULT.read_bytes(), type=PipelineConfig)
    assert cfg == config.load(DEFAULT)


# One source: the tables' texts give the schema, `config init` and the shipped file


def tables_of(cls: type[msgspec.Struct]) -> Iterator[type[msgspec.Struct]]:
    """``cls`` and every table under it, lists of tables (pool members) included."""
    yield cls
    for f in msgspec.structs.fields(cls):
        inner = f.type
        if getattr(inner, "__origin__", None) is list:
            inner = inner.__args__[0]
        if isinstance(inner, type) and issubclass(inner, msgspec.Struct):
            yield from tables_of(inner)


def words(text: str) -> str:
    """Comment or docstring text with the ``#`` marks and the line breaks gone."""
    return " ".join(" ".join(line.strip().lstrip("#") for line in text.splitlines()).split())


def test_the_repository_file_is_config_init_output() -> None:
    """config/pipeline.toml is generated: regenerate it with
    `mpipeline config init --force config/pipeline.toml` after changing a table."""
    assert DEFAULT.read_text() == config.default_toml(), (
        "config/pipeline.toml is stale: mpipeline config init --force config/pipeline.toml"
    )


def test_every_table_and_field_has_its_text_and_examples_that_validate() -> None:
    for cls in tables_of(PipelineConfig):
        assert (cls.__doc__ or "").strip(), f"{cls.__name__} needs a docstring"
        for name, text, examples in _config_commented.field_texts(cls):
            info = {f.name: f for f in msgspec.structs.fields(cls)}[name]
            if isinstance(info.type, type) and issubclass(info.type, msgspec.Struct):
                continue  # a table: its docstring is its text
            assert text, f"{cls.__name__}.{name} needs a _doc text"
            for example in examples:
                msgspec.convert(example, type=info.type)
            unset = info.default is None
            assert not unset or examples, f"{cls.__name__}.{name} is unset: give an example"


def test_the_file_and_the_schema_carry_the_same_texts() -> None:
    file = words(config.default_toml())
    defs = config.json_schema()["$defs"]
    for cls in tables_of(PipelineConfig):
        if cls is config.PoolUpstreamConfig:
            continue  # members of a list: the file shows an example of them
        schema = defs[cls.__name__]
        assert words(schema["description"]) in file, cls.__name__
        for name, prop in schema["properties"].items():
            texts = [prop.get("description")]
            texts += [branch.get("description") for branch in prop.get("anyOf", ())]
            for text in filter(None, texts):
                assert words(text) in file, f"{cls.__name__}.{name}"


def test_unset_fields_are_written_commented_with_their_example() -> None:
    text = config.default_toml()
    assert '\n# auth_token_env = "MPIPELINE_TOKEN"\n' in text
    assert "\n# max_tokens = 512\n# Sampling temperature" in text
    assert '#   [[stages.inference.pool.upstreams]]\n#   name = "vllm-a"\n' in text
    # The stages' shared fields are listed once, then written bare in each stage.
    assert text.count("#   ring_capacity ") == 1
    assert "[stages.post]\n# Filters and formats the output, chunk by chunk on streams.\n\n" in text
    assert '\nreplicas = 1\ncpus = "auto"\n' in text
    # A stage that documents a shared field its own way says so (inference's shards).
    assert "# Shards: processes running the model worker.\nreplicas = 2\n" in text
    assert max(map(len, text.splitlines())) <= _config_commented.WIDTH


def test_comments_keep_code_spans_and_indented_lines_whole() -> None:
    # 60 characters, then a span that would fit only in part: it moves down whole.
    lines = _config_commented._comment(
        "word " * 12 + "`mpipeline run --metrics-port` and more.\n  kept   as is\n\nNext."
    )
    assert lines == [
        "# " + ("word " * 12).strip(),
        "# `mpipeline run --metrics-port` and more.",
        "#   kept   as is",
        "#",
        "# Next.",
    ]


def test_an_unset_field_without_an_example_is_a_developers_error() -> None:
    class Bare(msgspec.Struct, frozen=True, kw_only=True):
        """A table."""

        x: int | None = None

    with pytest.raises(TypeError, match="x is unset by default and has no example"):
        _config_commented.commented_toml(Bare)


# Finding the file, overrides, the shipped files


def test_locate_prefers_the_option_then_the_environment_then_the_default_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    assert config.locate(None) is None  # the built-in defaults
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "pipeline.toml").write_text("")
    assert config.locate(None) == config.DEFAULT_PATH
    monkeypatch.setenv(config.CONFIG_ENV, "")  # empty: as if unset
    assert config.locate(None) == config.DEFAULT_PATH
    monkeypatch.setenv(config.CONFIG_ENV, "env.toml")
    assert config.locate(None) == Path("env.toml")  # named, so returned even if missing
    assert config.locate(Path("opt.toml")) == Path("opt.toml")


def test_no_file_means_the_defaults_checked_like_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.load(None) == PipelineConfig()
    monkeypatch.setattr(config, "_free_shm_bytes", lambda: 1 << 20)
    [issue] = config.validate(None)
    assert issue.file == config.DEFAULTS and "rings need" in issue.message


def test_overrides_replace_the_files_values_and_are_checked(tmp_path: Path) -> None:
    path = write(tmp_path, "[gateway]\nport = 8181\nhost = '0.0.0.0'\n")
    cfg = config.load(path, {"gateway.host": "127.0.0.1", "gateway.port": 0, "metrics.port": 0})
    assert (cfg.gateway.host, cfg.gateway.port, cfg.metrics.port) == ("127.0.0.1", 0, 0)
    assert config.load(None, {"gateway.port": 9000}).gateway.port == 9000
    issues = config.validate(path, {"gateway.port": 70000, "gateway.host": "bad host"})
    assert [str(i) for i in issues] == [
        "command line: gateway.port: must be <= 65535",
        "command line: gateway.host: 'bad host' is neither an IP address nor a hostname",
    ]
    [clash] = config.validate(None, {"gateway.port": 9090})
    assert str(clash) == "built-in defaults: metrics.port: is the same as gateway.port (9090)"
    # An override under a key the file misuses leaves the file's error to speak.
    bad = write(tmp_path, "gateway = 3\n")
    [issue] = config.validate(bad, {"gateway.port": 0})
    assert (issue.line, issue.field) == (1, "gateway")


def test_shipped_files_are_the_repositorys_config_files() -> None:
    shipped = config.shipped_files()
    assert list(shipped) == [
        "pipeline.toml",
        "grafana/mpipeline.json",
        "prometheus/alerts.yml",
        "prometheus/prometheus.yml",
    ]
    package = ROOT / "mpipeline" / "config" / "files"
    for name, data in shipped.items():
        assert (ROOT / "config" / name).read_bytes() == data, name
        if name != "pipeline.toml":  # one copy: config/ links to the package's
            assert (ROOT / "config" / name).resolve() == package / name


def test_export_writes_everything_or_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    written = config.export(out)
    assert [p.relative_to(out).as_posix() for p in written] == list(config.shipped_files())
    (out / "grafana" / "mpipeline.json").write_text("mine")
    (out / "pipeline.toml").unlink()
    with pytest.raises(FileExistsError) as exists:
        config.export(out)
    assert exists.value.filename == str(out / "grafana" / "mpipeline.json")
    assert not (out / "pipeline.toml").exists()  # refused before the first write
    config.export(out, force=True)
    assert (out / "grafana" / "mpipeline.json").read_bytes() != b"mine"
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        config.export(tmp_path / "file")


def test_write_new_refuses_what_it_cannot_write_as_asked(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.toml"
    config.write_new(target, b"one")  # missing folders are made
    with pytest.raises(FileExistsError):
        config.write_new(target, b"two")
    config.write_new(target, b"two", force=True)
    assert target.read_bytes() == b"two"
    with pytest.raises(IsADirectoryError):
        config.write_new(tmp_path / "a", b"x", force=True)
    with pytest.raises(NotADirectoryError):
        config.write_new(target / "c.toml", b"x")


# Reading and syntax


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert [str(i) for i in config.validate(path)] == [f"{path}: no such file"]


def test_unreadable_file(tmp_path: Path) -> None:
    [issue] = config.validate(tmp_path)
    assert issue.line is None and issue.message.startswith("cannot read:")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "cfg.toml"
    path.write_bytes(b"run_dir = '\xff'\n")
    [issue] = config.validate(path)
    assert issue.message.startswith("cannot read:")


def test_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    assert only_issue(tmp_path, "[gateway]\nport = \n") == (
        2,
        "",
        "TOML syntax: Invalid value at column 8",
    )


def test_syntax_error_at_end_of_file(tmp_path: Path) -> None:
    assert only_issue(tmp_path, 'run_dir = "x\n\n')[0] == 1
    line, _, message = only_issue(tmp_path, "[gateway]\nport = 1\nhost = ")
    assert (line, message) == (3, "TOML syntax: Invalid value at end of file")


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, "")) == PipelineConfig()


# Keys and types


def test_unknown_key_suggests_the_near_one(tmp_path: Path) -> None:
    text = """
    [stages.rag]
    replcas = 2
    """
    assert only_issue(tmp_path, text) == (
        2,
        "stages.rag.replcas",
        "unknown key; did you mean 'replicas'?",
    )


def test_unknown_table_lists_the_known_ones(tmp_path: Path) -> None:
    line, field, message = only_issue(tmp_path, "[zzz]\na = 1\n")
    assert (line, field) == (1, "zzz")
    assert (
        message
        == "unknown key; expected name, run_dir, models, supervisor, gateway, metrics, stages"
    )


def test_wrong_types(tmp_path: Path) -> None:
    text = """
    [stages.inference]
    replicas = 1.5
    echo = { max_tokens = "x" }
    [stages.rag]
    documents = 3
    enabled = "yes"
    full_policy = 3
    """
    assert issues_of(tmp_path, text) == [
        (2, "stages.inference.replicas", "expected int, got float"),
        (3, "stages.inference.echo.max_tokens", "expected int, got str"),
        (5, "stages.rag.documents", "expected str | null, got int"),
        (6, "stages.rag.enabled", "expected bool, got str"),
        (7, "stages.rag.full_policy", "expected str, got int"),
    ]


def test_literal_choices_are_named(tmp_path: Path) -> None:
    text = """
    [stages.assemble]
    template = "jinja"
    cpus = "all"
    """
    assert issues_of(tmp_path, text) == [
        (2, "stages.assemble.template", "must be 'plain' or 'chatml', not 'jinja'"),
        (3, "stages.assemble.cpus", "must be a list or 'auto', not 'all'"),
    ]


def test_a_table_where_a_value_is_expected_and_back(tmp_path: Path) -> None:
    text = """
    stages = 3
    [gateway.port]
    x = 1
    """
    assert issues_of(tmp_path, text) == [
        (1, "stages", "expected a table, got int"),
        (2, "gateway.port", "expected int, got object"),
    ]


def test_inline_table_of_the_wrong_kind(tmp_path: Path) -> None:
    text = """
    [stages.inference]
    echo = 5
    """
    assert only_issue(tmp_path, text) == (2, "stages.inference.echo", "expected a table, got int")


# Values


def test_replicas_below_one_exact_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("cfg.toml").write_text("# pipeline\n\n[stages.rag]\nreplicas = 0\n")
    [issue] = config.validate(Path("cfg.toml"))
    assert str(issue) == "cfg.toml:4: stages.rag.replicas: must be >= 1"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (4097, "must be a multiple of 8"),
        (1024, "must be >= 4096"),
        (100, "must be >= 4096; must be a multiple of 8"),
        (2 << 30, "must be <= 1073741824"),
    ],
)
def test_ring_capacity_bounds(tmp_path: Path, value: int, message: str) -> None:
    text = f"[stages.post]\nring_capacity = {value}\n"
    assert only_issue(tmp_path, text) == (2, "stages.post.ring_capacity", message)


def test_timeouts_must_be_positive(tmp_path: Path) -> None:
    text = """
    [supervisor]
    drain_timeout_s = -1
    [stages.stream]
    timeout_s = 0
    [stages.inference.echo]
    token_delay_ms = -0.5
    """
    assert issues_of(tmp_path, text) == [
        (2, "supervisor.drain_timeout_s", "must be > 0"),
        (4, "stages.stream.timeout_s", "must be > 0"),
        (6, "stages.inference.echo.token_delay_ms", "must be >= 0"),
    ]


def test_nan_falls_back_to_msgspecs_words(tmp_path: Path) -> None:
    _, field, message = only_issue(tmp_path, "[stages.rag]\ntimeout_s = nan\n")
    assert field == "stages.rag.timeout_s" and "> 0" in message


@pytest.mark.parametrize(
    ("table", "port", "message"),
    [
        ("gateway", -1, "must be >= 0"),
        ("metrics", -1, "must be >= 0"),
        ("metrics", 70000, "must be <= 65535"),
    ],
)
def test_bad_ports(tmp_path: Path, table: str, port: int, message: str) -> None:
    assert only_issue(tmp_path, f"[{table}]\nport = {port}\n") == (2, f"{table}.port", message)


def test_metrics_port_zero_picks_a_free_one(tmp_path: Path) -> None:
    # state.json's metrics_url has the real port; two runs never collide.
    assert issues_of(tmp_path, "[gateway]\nport = 0\n[metrics]\nport = 0\n") == []


def test_metrics_and_gateway_ports_collide(tmp_path: Path) -> None:
    text = "[gateway]\nport = 9000\n[metrics]\nport = 9000\n"
    assert only_issue(tmp_path, text) == (4, "metrics.port", "is the same as gateway.port (9000)")
    assert issues_of(tmp_path, text + "enabled = false\n") == []


@pytest.mark.parametrize(
    "host", ["", "not a host", "-bad.example", "a..b", "1.2.3.999", "x" * 64, "a." * 127 + "a"]
)
def test_bad_hosts(tmp_path: Path, host: str) -> None:
    line, field, message = only_issue(tmp_path, f'[gateway]\nhost = "{host}"\n')
    assert (line, field) == (2, "gateway.host")
    assert message == f"{host!r} is neither an IP address nor a hostname"


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "0.0.0.0", "::1", "localhost", "api.example.com", "example.com."]
)
def test_good_hosts(tmp_path: Path, host: str) -> None:
    assert issues_of(tmp_path, f'[metrics]\nhost = "{host}"\n') == []


@pytest.mark.parametrize("field", ["auth_token_env", "admin_token_env"])
def test_token_env_must_be_a_name_and_is_never_echoed(tmp_path: Path, field: str) -> None:
    text = f'[gateway]\n{field} = "sk-live-123"\n'
    [issue] = config.validate(write(tmp_path, text))
    assert issue.field == f"gateway.{field}"
    assert "sk-live" not in str(issue)


def test_an_admin_token_env_that_is_unset_here_is_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = msgspec.structs.replace(
        PipelineConfig(),
        gateway=msgspec.structs.replace(
            PipelineConfig().gateway, admin_token_env="MPIPELINE_TEST_ADMIN_UNSET"
        ),
    )
    monkeypatch.delenv("MPIPELINE_TEST_ADMIN_UNSET", raising=False)
    [warning] = [w for w in config.warnings(cfg) if "admin_token_env" in w]
    assert "configure will be refused over HTTP" in warning
    monkeypatch.setenv("MPIPELINE_TEST_ADMIN_UNSET", "s3cret-admin")
    assert not [w for w in config.warnings(cfg) if "admin_token_env" in w]


def test_supervisor_cross_checks(tmp_path: Path) -> None:
    text = """
    [supervisor]
    backoff_initial_s = 5.0
    backoff_max_s = 1.0
    heartbeat_interval_s = 3.0
    liveness_timeout_s = 3.0
    """
    assert issues_of(tmp_path, text) == [
        (3, "supervisor.backoff_max_s", "must be >= backoff_initial_s"),
        (5, "supervisor.liveness_timeout_s", "must be > heartbeat_interval_s"),
    ]


# Cores


def test_cpus_outside_the_affinity_mask(tmp_path: Path) -> None:
    text = "[stages.rag]\ncpus = [1, 7, 8, 9, 12]\n"
    assert only_issue(tmp_path, text) == (
        2,
        "stages.rag.cpus",
        "7-9,12 outside the CPU affinity (allowed: 0-3)",
    )


def test_cpus_shape_problems(tmp_path: Path) -> None:
    text = """
    [supervisor]
    cpus = []
    [gateway]
    cpus = [1, 1, 2]
    [stages.post]
    cpus = [0, 1]
    cores_per_replica = 3
    [stages.stream]
    cores_per_replica = 5
    """
    assert issues_of(tmp_path, text) == [
        (2, "supervisor.cpus", 'must list at least one core (or be "auto")'),
        (4, "gateway.cpus", "lists 1 more than once"),
        (7, "stages.post.cores_per_replica", "is 3 but cpus lists 2"),
        (9, "stages.stream.cores_per_replica", "is 5 but only 0-3 are available"),
    ]


def test_disabled_rag_is_not_checked_or_counted(tmp_path: Path) -> None:
    text = "[stages.rag]\nenabled = false\ncpus = [99]\n"
    path = write(tmp_path, text)
    assert config.validate(path) == []
    cfg = config.load(path)
    assert [name for name, _ in config.active_stages(cfg)] == [
        "assemble",
        "inference",
        "post",
        "stream",
    ]
    assert "rag-0" not in config.pinning(cfg)


# /dev/shm


def test_rings_larger_than_dev_shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "_free_shm_bytes", lambda: 10 * MIB)
    text = "[stages.inference]\nreplicas = 8\n\n[stages.post]\nring_capacity = 4194304\n"
    [issue] = config.validate(write(tmp_path, text))
    # 8 shards x 4 MiB post rings = 32 MiB is the largest share; its line is the field's.
    assert (issue.line, issue.field) == (5, "stages.post.ring_capacity")
    need = config.ring_bytes_total(
        config.PipelineConfig(
            stages=config.StagesConfig(
                inference=config.InferenceConfig(replicas=8),
                post=config.PostConfig(ring_capacity=4 * MIB),
            )
        )
    )
    assert f"rings need {need / MIB:.1f} MiB" in issue.message
    assert "/dev/shm has 10.0 MiB free" in issue.message


def test_shm_error_on_a_defaulted_field_points_at_its_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "_free_shm_bytes", lambda: 10 * MIB)
    [issue] = config.validate(write(tmp_path, "[stages.rag]\nreplicas = 64\n"))
    assert (issue.line, issue.field) == (1, "stages.rag.ring_capacity")
    # With no [gateway] table written, the return rings' issue has no line at all.
    [issue] = config.validate(write(tmp_path, ""))
    assert (issue.line, issue.field) == (None, "gateway.ring_capacity")
    assert str(issue).startswith(f"{tmp_path / 'cfg.toml'}: gateway.ring_capacity: rings need")


def test_no_dev_shm_means_no_shm_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "_free_shm_bytes", lambda: None)
    assert config.validate(write(tmp_path, "[stages.rag]\nreplicas = 64\n")) == []


def test_real_machine_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    cpus = REAL_AVAILABLE_CPUS()
    assert cpus == sorted(os.sched_getaffinity(0))
    free = REAL_FREE_SHM()
    assert free is None or free >= 0
    monkeypatch.setattr(config, "SHM_DIR", "/nonexistent/shm")
    assert REAL_FREE_SHM() is None
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert REAL_AVAILABLE_CPUS() == [0]


# All at once


def test_every_error_is_reported_in_line_order(tmp_path: Path) -> None:
    text = """
    bogus = 1
    [gateway]
    port = 70000
    host = "no spaces allowed"
    [stages.rag]
    replicas = 0
    cpus = [42]
    ring_capacity = 5001
    [stages.inference]
    full_policy = "drop"
    """
    path = write(tmp_path, text)
    expected = [
        (1, "bogus"),
        (3, "gateway.port"),
        (4, "gateway.host"),
        (6, "stages.rag.replicas"),
        (7, "stages.rag.cpus"),
        (8, "stages.rag.ring_capacity"),
        (10, "stages.inference.full_policy"),
    ]
    assert [(i.line, i.field) for i in config.validate(path)] == expected
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert [(i.line, i.field) for i in caught.value.issues] == expected
    assert str(caught.value).splitlines() == [str(i) for i in caught.value.issues]


def test_load_of_a_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "missing.toml")


def test_issue_text_forms() -> None:
    assert str(ConfigIssue("a.toml", 3, "x.y", "bad")) == "a.toml:3: x.y: bad"
    assert str(ConfigIssue("a.toml", None, "x.y", "bad")) == "a.toml: x.y: bad"
    assert str(ConfigIssue("a.toml", 1, "", "bad")) == "a.toml:1: bad"
    assert ConfigError("plain").issues == []


# Warnings


def test_no_warnings_when_everything_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "_available_cpus", lambda: list(range(16)))
    assert config.warnings(PipelineConfig()) == []


def test_oversubscription_warns() -> None:
    cfg = PipelineConfig(stages=config.StagesConfig(inference=config.InferenceConfig(replicas=4)))
    [warning] = config.warnings(cfg)
    assert (
        warning == "9 pinned processes (stage replicas and the gateway/client) want 9 cores "
        "but only 4 are available (0-3): they will share cores"
    )


def test_explicitly_shared_core_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "_available_cpus", lambda: list(range(16)))
    cfg = PipelineConfig(
        gateway=config.GatewayConfig(cpus=[3]),
        stages=config.StagesConfig(inference=config.InferenceConfig(replicas=1, cpus=[3])),
    )
    assert config.warnings(PipelineConfig(stages=cfg.stages)) == []
    [warning] = config.warnings(cfg)
    assert warning == "cores shared by several replicas: 3 (gateway-0, inference-0)"


def test_open_gateway_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "_available_cpus", lambda: list(range(16)))

    def gateway_warnings(host: str, auth_token_env: str | None = None) -> list[str]:
        gateway = config.GatewayConfig(host=host, auth_token_env=auth_token_env)
        return config.warnings(PipelineConfig(gateway=gateway))

    assert gateway_warnings(host="localhost") == []
    assert gateway_warnings(host="::1") == []
    assert gateway_warnings(host="0.0.0.0") == [
        "gateway listens on 0.0.0.0 with no auth_token_env: anyone can use it"
    ]
    assert len(gateway_warnings(host="api.example.com")) == 1
    monkeypatch.delenv("MPL_TEST_TOKEN", raising=False)
    assert gateway_warnings(host="0.0.0.0", auth_token_env="MPL_TEST_TOKEN") == [
        "gateway.auth_token_env names MPL_TEST_TOKEN, which is not set here"
    ]
    monkeypatch.setenv("MPL_TEST_TOKEN", "s3cret")
    assert gateway_warnings(host="0.0.0.0", auth_token_env="MPL_TEST_TOKEN") == []


# Schema and TOML output


def test_json_schema_covers_every_section() -> None:
    schema = json.loads(json.dumps(config.json_schema()))
    defs = schema["$defs"]
    assert schema["$ref"] == "#/$defs/PipelineConfig"
    assert set(defs["PipelineConfig"]["properties"]) == {
        "name",
        "run_dir",
        "models",
        "supervisor",
        "gateway",
        "metrics",
        "stages",
    }
    assert set(defs["StagesConfig"]["properties"]) == set(config.STAGE_ORDER)
    rag = defs["RagConfig"]["properties"]
    assert rag["replicas"]["minimum"] == 1 and rag["replicas"]["description"]
    assert rag["ring_capacity"]["multipleOf"] == 8
    assert all(d["additionalProperties"] is False for d in defs.values())


def test_dump_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPL_TEST_TOKEN", "s3cret-value")
    cfg = PipelineConfig(
        run_dir="/run/x",
        supervisor=config.SupervisorConfig(cpus=[0]),
        gateway=config.GatewayConfig(auth_token_env="MPL_TEST_TOKEN", cpus=[1, 2]),
        stages=config.StagesConfig(
            rag=config.RagConfig(documents="docs/", enabled=False),
            assemble=config.AssembleConfig(system_prompt='Say "hi"\n\tthen \\ stop. \x7f é'),
            inference=config.InferenceConfig(echo=config.EchoConfig(token_delay_ms=2.5)),
            stream=config.StreamConfig(sink_jsonl="out.jsonl", full_policy="shed"),
        ),
    )
    text = config.dump_toml(cfg)
    assert "s3cret" not in text and 'auth_token_env = "MPL_TEST_TOKEN"' in text
    assert "\n[stages]\n" not in text  # a table of tables needs no header of its own
    assert config.load(write(tmp_path, text)) == cfg
    assert config.load(write(tmp_path, config.dump_toml(PipelineConfig()))) == PipelineConfig()


@given(st.text())
def test_any_string_round_trips(prompt: str) -> None:
    cfg = PipelineConfig(
        stages=config.StagesConfig(assemble=config.AssembleConfig(system_prompt=prompt))
    )
    text = config.dump_toml(cfg)
    assert msgspec.toml.decode(text.encode(), type=PipelineConfig) == cfg


def test_toml_scalars() -> None:
    assert _config_toml.write_toml({"a": math.inf, "b": -math.inf, "c": [1, 2], "d": False}) == (
        "a = inf\nb = -inf\nc = [1, 2]\nd = false\n"
    )
    assert _config_toml.write_toml({"n": math.nan, "t": {}}) == "n = nan\n\n[t]\n"
    with pytest.raises(TypeError, match="cannot write bytes"):
        _config_toml.write_toml({"b": b"x"})


# Run dir


@pytest.mark.parametrize("name", ["../up", "a/b", "UPPER", ".hidden", "x" * 65, " "])
def test_a_name_must_be_one_plain_path_component(name: str) -> None:
    with pytest.raises(msgspec.ValidationError, match="name"):
        msgspec.convert({"name": name}, PipelineConfig)


# Topology arithmetic


def test_ring_bytes_default() -> None:
    # 3 clients (1 gateway + 2 API slots) -> rag: 3 rings; rag -> assemble: 1;
    # assemble -> 2 shards: 2; 2 shards -> post: 2; post -> stream: 1, all 1 MiB;
    # stream -> 3 client ends: 3 x 4 MiB.
    assert config.ring_bytes(PipelineConfig()) == {
        "rag": 3 * MIB,
        "assemble": 1 * MIB,
        "inference": 2 * MIB,
        "post": 2 * MIB,
        "stream": 1 * MIB,
        "gateway": 12 * MIB,
        # rag, assemble, 2 shards and post each have an error ring to every client.
        "errors": 5 * 3 * config.ERROR_RING_BYTES,
    }
    assert config.ring_bytes_total(PipelineConfig()) == 21 * MIB + 15 * config.ERROR_RING_BYTES


def test_ring_bytes_use_the_consumers_capacity_and_skip_disabled_rag() -> None:
    cfg = PipelineConfig(
        gateway=config.GatewayConfig(replicas=2, ring_capacity=8192),
        stages=config.StagesConfig(
            rag=config.RagConfig(enabled=False, ring_capacity=1 << 30),
            assemble=config.AssembleConfig(replicas=2, ring_capacity=4096),
            inference=config.InferenceConfig(replicas=3, ring_capacity=16384),
            stream=config.StreamConfig(replicas=2),
        ),
    )
    assert config.ring_bytes(cfg) == {
        "assemble": 4 * 2 * 4096,
        "inference": 2 * 3 * 16384,
        "post": 3 * 1 * MIB,
        "stream": 1 * 2 * MIB,
        "gateway": 2 * 4 * 8192,
        "errors": (2 + 3 + 1) * 4 * config.ERROR_RING_BYTES,
    }


def test_cpus_for_a_list() -> None:
    stage = config.StageConfig(cpus=[4, 5, 6], cores_per_replica=2)
    assert [config.cpus_for(stage, i, [0, 1]) for i in range(3)] == [[4, 5], [4, 6], [5, 6]]
    one = config.StageConfig(cpus=[2, 3])
    assert [config.cpus_for(one, i, [0], stage_offset=7) for i in range(3)] == [[2], [3], [2]]


def test_cpus_for_auto_spreads_from_the_offset() -> None:
    stage = config.StageConfig(replicas=3)
    assert [config.cpus_for(stage, i, [0, 2, 4, 6], stage_offset=1) for i in range(3)] == [
        [2],
        [4],
        [6],
    ]
    wide = config.StageConfig(cores_per_replica=2)
    assert config.cpus_for(wide, 1, [0, 1, 2], stage_offset=2) == [1, 2]


def test_pinning_spreads_stages_in_flow_order() -> None:
    assert config.pinning(PipelineConfig(), list(range(8))) == {
        "gateway-0": [0],
        "rag-0": [1],
        "assemble-0": [2],
        "inference-0": [3],
        "inference-1": [4],
        "post-0": [5],
        "stream-0": [6],
    }
    # Without a mask given, the process's own (4 cores here) is used, wrapping around.
    assert config.pinning(PipelineConfig())["stream-0"] == [2]


# The line finder


def test_key_lines_handles_all_toml_shapes() -> None:
    text = textwrap.dedent(
        '''
        top = 1 # comment
        "quoted key" = 'literal # not a comment'
        [ a . "b" ]
        s = """
        [not.a.table]
        fake = 1
        """
        t = """ends with quotes"" """
        u = """x"""""
        esc = "a \\" [b] = 2"
        lit = \'\'\'
        no = 'key'
        \'\'\'
        arr = [
          1, # one
          [2, 3],
          { x = 1 },
        ]
        inl = { p = 1, q = { r = "}" } }
        dotted.key = 2
        [[arr_of_tables]]
        z = 1999-01-01T00:00:00
        [[arr_of_tables]]
        z = 2
        [arr_of_tables.sub]
        y = 3
        [[arr_of_tables.inner]]
        w = 4
        '''
    ).lstrip("\n")
    lines = _config_toml.key_lines(text)
    assert lines == {
        "top": 1,
        "quoted key": 2,
        "a.b": 3,
        "a.b.s": 4,
        "a.b.t": 8,
        "a.b.u": 9,
        "a.b.esc": 10,
        "a.b.lit": 11,
        "a.b.arr": 14,
        "a.b.arr.x": 17,
        "a.b.inl": 19,
        "a.b.inl.p": 19,
        "a.b.inl.q": 19,
        "a.b.inl.q.r": 19,
        "a.b.dotted.key": 20,
        # Each [[member]] is indexed, and so are the tables under it.
        "arr_of_tables": 21,
        "arr_of_tables[0]": 21,
        "arr_of_tables[0].z": 22,
        "arr_of_tables[1]": 23,
        "arr_of_tables[1].z": 24,
        "arr_of_tables[1].sub": 25,
        "arr_of_tables[1].sub.y": 26,
        "arr_of_tables[1].inner": 27,
        "arr_of_tables[1].inner[0]": 27,
        "arr_of_tables[1].inner[0].w": 28,
    }


@pytest.mark.parametrize("text", ["= 1", "a 1", "a = ", "a = 'open", "a = 1\n[b", "# end"])
def test_key_lines_stops_quietly_on_what_it_cannot_read(text: str) -> None:
    assert set(_config_toml.key_lines(text)) <= {"a", "b"}


def test_line_of_falls_back_to_the_enclosing_table() -> None:
    lines = {"stages.rag": 4, "stages.rag.replicas": 5}
    assert _config_toml.line_of(lines, "stages.rag.replicas") == 5
    assert _config_toml.line_of(lines, "stages.rag.cpus") == 4
    assert _config_toml.line_of(lines, "gateway.port") is None
