"""Tests for the `feddiff` CLI's own commands: model-info, strategies and split, with --json; the flags of health,
status and certs, each value refused in one line before anything is reached or written; and the help of every
command's options."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from feddiff.cli import COMMANDS, build_parser, main
from tests.parsers import subcommands

REPO = Path(__file__).resolve().parents[2]


def _run_json(capsys, argv: list[str]):
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0
    return out, json.loads(out)


def test_model_info_json_is_exact(capsys) -> None:
    out, _ = _run_json(capsys, ["model-info", "--model", "paper-fmnist", "--json"])

    assert out == ('{"model": "paper-fmnist", "total": 2996315, "parts": {"encoder": 1280642, "bottleneck": 999376, "decoder": 716297}}\n')


def test_model_info_text_names_every_part(capsys) -> None:
    assert main(["model-info", "--model", "tiny"]) == 0

    out = capsys.readouterr().out
    assert out.splitlines()[0] == "tiny: 143,951 parameters"
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["encoder", "bottleneck", "decoder"]


PRESETS = "'paper-fmnist', 'paper-celeba64', 'tiny', 'diffusers-tiny', 'diffusers-fmnist', 'ddpm-cifar10'"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["model-info", "--model", "nope"], f"--model = 'nope': expected one of {PRESETS}"),
        (["strategies", "--model", "nope"], f"--model = 'nope': expected one of {PRESETS}"),
        (["strategies", "--num-clients", "0"], "--num-clients = '0': expected an integer >= 1"),
        (["strategies", "--num-clients", "2.5"], "--num-clients = '2.5': expected an integer >= 1"),
        (["strategies", "--rounds", "0"], "--rounds = '0': expected an integer >= 1"),
        (["strategies", "--seed", "-1"], "--seed = '-1': expected an integer in 0..18446744073709551615"),
        (
            ["strategies", "--num-clients", "1000", "--rounds", "1001"],
            "--num-clients 1000 and --rounds 1001 are 1,001,000 client-rounds, each counted one by one: give at most 1,000,000",
        ),
        (
            ["strategies", "--compression", "none,int3"],
            "--compression = 'none,int3': expected codec names, comma-separated; unknown codec 'int3': expected none, bf16, int8[:B], int4[:B] or "
            "topk:F[+bf16|+int8[:B]|+int4[:B]] (B a block size in 1..1048576, F a fraction in (0, 1] written with digits and a point, as 0.05 or 1)",
        ),
    ],
)
def test_a_bad_value_of_model_info_or_strategies_is_refused_in_one_line_with_status_2(argv: list[str], line: str, capsys) -> None:
    code = main(argv)

    assert code == 2
    assert capsys.readouterr() == ("", f"feddiff {argv[0]}: error: {line}\n")


HOST = "a DNS name (letters, digits, hyphens and dots) or an IP address"
TOOL = ["--address", "127.0.0.1:1"]  # nothing listens there: a refused flag must stop the command before it dials


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["status", *TOOL, "--timeout", "-1"], "--timeout = '-1': expected more than 0 s, up to 604800 s (a week)"),
        (["health", *TOOL, "--timeout", "nan"], "--timeout = 'nan': expected more than 0 s, up to 604800 s (a week)"),
        (["health", "--coordinator", "coordinator"], "--address = 'coordinator': expected HOST:PORT with a port in 1..65535"),
        (["status", "--address", "127.0.0.1:0"], "--address = '127.0.0.1:0': expected HOST:PORT with a port in 1..65535"),
        (["health", *TOOL, "--tls-ca", "{missing}"], "--tls-ca = '{missing}': expected a readable file; no such file or folder"),
        (["status", *TOOL, "--tls-ca", "{file}", "--tls-key", "{tmp}"], "--tls-key = '{tmp}': expected a readable file; not a file"),
        (["status", *TOOL, "--token-file", "{missing}"], "--token-file = '{missing}': expected a readable file; no such file or folder"),
        (["status", *TOOL, "--token-file", "{blank}"], "--token-file = '{blank}': expected a readable file; the file is empty or holds only blanks"),
        (["status", *TOOL, "--token-file", ""], "--token-file = '': expected a readable file; the flag is given empty"),
        (["health", *TOOL, "--tls-ca", ""], "--tls-ca = '': expected a readable file; the flag is given empty"),
        (
            ["certs", "--out-dir", "{out}", "--coordinator-host", "a" * 300],
            f"--coordinator-host = '{'a' * 300}': expected {HOST}; 300 characters: a DNS name has at most 253",
        ),
        (
            ["certs", "--out-dir", "{out}", "--coordinator-host", "a" * 64 + ".example"],
            f"--coordinator-host = '{'a' * 64}.example': expected {HOST}; label '{'a' * 20}'... has 64 characters: a DNS label has at most 63",
        ),
        (
            ["health", *TOOL, "--tls-ca", "{file}", "--tls-cert", "{file}"],
            "--tls-cert and --tls-key go together: give both (a client certificate and its key), or neither",
        ),
        (
            ["status", *TOOL, "--tls-cert", "{file}", "--tls-key", "{file}"],
            "--tls-cert needs --tls-ca, the CA the coordinator's certificate is checked against (without it: plain text)",
        ),
        (["health", *TOOL, "--insecure", "--tls-ca", "{file}"], "--insecure and --tls-ca: give one, plain text or TLS checked against this CA"),
        (
            ["certs", "--out-dir", "{out}", "--worker", "hospital-1", "--worker", "ca"],
            "--worker = 'ca': expected a worker id other than 'ca' and 'coordinator'",
        ),
        (
            ["certs", "--out-dir", "{out}", "--worker", "a/b"],
            "--worker = 'a/b': expected a worker id other than 'ca' and 'coordinator'; a worker id takes 1..128 characters of [A-Za-z0-9._-]",
        ),
        (["certs", "--out-dir", ""], "--out-dir = '': expected a folder path"),
        (["certs", "--out-dir", "{out}", "--coordinator-host", ""], f"--coordinator-host = '': expected {HOST}; an empty name"),
        (["certs", "--out-dir", "{out}", "--coordinator-host", " \t"], f"--coordinator-host = ' \\t': expected {HOST}; an empty name"),
        (
            ["certs", "--out-dir", "{out}", "--coordinator-host", "ok.example", "--coordinator-host", "my host"],
            f"--coordinator-host = 'my host': expected {HOST}; a name with a space in it",
        ),
        (
            ["certs", "--out-dir", "{out}", "--coordinator-host=-bad.example"],
            f"--coordinator-host = '-bad.example': expected {HOST}; label '-bad' is not letters, digits and inner hyphens",
        ),
        (["health", *TOOL, "--tls-ca", "{file}", "--tls-server-name", " "], f"--tls-server-name = ' ': expected {HOST}; an empty name"),
        (
            ["status", *TOOL, "--tls-ca", "{file}", "--tls-server-name", "a..b"],
            f"--tls-server-name = 'a..b': expected {HOST}; label '' is not letters, digits and inner hyphens",
        ),
    ],
)
def test_a_bad_value_of_health_status_or_certs_is_refused_in_one_line_with_status_2(argv: list[str], line: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("not a certificate")
    (tmp_path / "blank").write_text(" \n")
    paths = {"{missing}": str(tmp_path / "missing"), "{file}": str(tmp_path / "file"), "{tmp}": str(tmp_path), "{out}": str(tmp_path / "out")}
    paths["{blank}"] = str(tmp_path / "blank")
    argv = [paths.get(a, a) for a in argv]
    for placeholder, path in paths.items():
        line = line.replace(placeholder, path)

    code = main(argv)

    assert code == 2
    assert capsys.readouterr() == ("", f"feddiff {argv[0]}: error: {line}\n")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from feddiff.certs import create_project

    out = tmp_path_factory.mktemp("pki")
    create_project(out, ["localhost"], ["client-0", "client-1"])
    (out / "bad").write_text("not a certificate\n")
    return out


@pytest.mark.parametrize("command", ["health", "status"])
@pytest.mark.parametrize(
    ("files", "line"),
    [
        ({"--tls-ca": "bad"}, "--tls-ca {bad}: not a PEM certificate"),
        ({"--tls-ca": "client-0.key"}, "--tls-ca {client-0.key}: not a PEM certificate"),
        ({"--tls-ca": "ca.crt", "--tls-cert": "bad", "--tls-key": "client-0.key"}, "--tls-cert {bad}: not a PEM certificate"),
        ({"--tls-ca": "ca.crt", "--tls-cert": "client-0.crt", "--tls-key": "bad"}, "--tls-key {bad}: not an unencrypted PEM private key"),
        (
            {"--tls-ca": "ca.crt", "--tls-cert": "client-0.crt", "--tls-key": "client-1.key"},
            "--tls-key {client-1.key}: not the key of the certificate in --tls-cert {client-0.crt}",
        ),
    ],
)
def test_health_and_status_check_their_tls_files_at_start_as_the_worker_does(
    command: str, files: dict[str, str], line: str, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listens at TOOL's address: a command that dialled would end with status 1 and UNAVAILABLE."""
    argv = [command, *TOOL, *(x for flag, name in files.items() for x in (flag, str(pki / name)))]
    for name in files.values():
        line = line.replace(f"{{{name}}}", str(pki / name))

    code = main(argv)

    out, err = capsys.readouterr()
    assert code == 2
    assert out == "" and err.startswith(f"feddiff {command}: error: {line}") and err.count("\n") == 1, err


@pytest.mark.parametrize("command", ["coordinator", "worker", "status"])
def test_one_check_refuses_a_bad_tls_file_alike_in_every_command(command: str, pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = {
        "coordinator": ["coordinator", "--tls-cert", str(pki / "coordinator.crt"), "--tls-key", str(pki / "coordinator.key")],
        "worker": ["worker", "--coordinator", "127.0.0.1:1", "--client-index", "0"],
        "status": ["status", *TOOL],
    }[command]

    code = main([*argv, "--tls-ca", str(pki / "bad")])

    assert code == 2
    assert capsys.readouterr().err == f"feddiff {command}: error: --tls-ca {pki / 'bad'}: not a PEM certificate\n"


def test_strategies_counts_the_bytes_with_each_codec_of_its_list(capsys) -> None:
    _, rows = _run_json(capsys, ["strategies", "--model", "tiny", "--num-clients", "2", "--rounds", "2", "--compression", "none, int8", "--json"])

    assert [(r["strategy"], r["compression"]) for r in rows] == [(s, c) for s in ("full", "usplit", "udec", "ulatdec") for c in ("none", "int8")]


def test_strategies_json_has_the_golden_values(capsys) -> None:
    _, rows = _run_json(capsys, ["strategies", "--model", "paper-fmnist", "--num-clients", "10", "--rounds", "15", "--json"])

    by_name = {r["strategy"]: r for r in rows}
    assert list(by_name) == ["full", "usplit", "udec", "ulatdec"]
    assert {s: round(r["reduction_vs_full"], 3) for s, r in by_name.items()} == {
        "full": 0.0,
        "usplit": 0.25,
        "udec": 0.736,
        "ulatdec": 0.413,
    }
    n, u = 2_996_315, 716_297
    assert by_name["full"]["parameters_total"] == by_name["full"]["full_fedavg_parameters"] == 2 * 10 * n * 15
    assert by_name["udec"]["parameters_total"] == 10 * (n + u) + 10 * 14 * 2 * u
    assert all(r["clients"] == 10 and r["rounds"] == 15 for r in rows)


def test_split_json_sizes_sum_to_the_training_set(capsys, fashion_mnist_dir) -> None:
    _, rows = _run_json(
        capsys,
        ["split", "--num-clients", "5", "--split", "label", "--beta", "0.5", "--split-seed", "2023", "--json", "--data-root", str(fashion_mnist_dir)],
    )

    assert [r["client"] for r in rows] == [0, 1, 2, 3, 4]
    assert sum(r["size"] for r in rows) == 60_000
    assert all(r["size"] >= 10 and sum(r["classes"]) == r["size"] and len(r["classes"]) == 10 for r in rows)
    # Label skew: the class mix differs between clients.
    assert len({tuple(r["classes"]) for r in rows}) == 5


def test_split_shows_the_shards_a_worker_of_the_same_flags_trains_on(capsys, fashion_mnist_dir) -> None:
    from fedcore.data.shards import client_shard
    from worker.config import from_args

    split = ["--num-clients", "3", "--split", "quantity", "--split-seed", "11", "--max-images", "600", "--data-root", str(fashion_mnist_dir)]
    _, rows = _run_json(capsys, ["split", *split, "--json"])
    worker = from_args(build_parser().parse_args(["worker", "--coordinator", "127.0.0.1:9", "--client-index", "2", *split]))

    assert sum(r["size"] for r in rows) == 600
    assert rows[2]["size"] == len(client_shard(worker.data, 2))


def test_split_into_more_clients_than_images_allow_names_the_flag(capsys, fashion_mnist_dir) -> None:
    code = main(["split", "--num-clients", "70000", "--data-root", str(fashion_mnist_dir)])

    assert code == 2
    assert capsys.readouterr().err == (
        "feddiff split: error: 60000 images cannot give 70000 clients at least 10 images each (needs 700000): lower the number of clients (--num-clients)\n"
    )


def test_a_label_split_at_a_tiny_beta_gives_each_class_to_one_client_without_a_warning(capsys, fashion_mnist_dir) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's RuntimeWarning of a 0 / 0 fails the command
        _, rows = _run_json(
            capsys,
            ["split", "--split", "label", "--beta", "1e-300", "--num-clients", "3", "--max-images", "1000", "--json", "--data-root", str(fashion_mnist_dir)],
        )

    assert sum(r["size"] for r in rows) == 1000
    assert all(sum(1 for r in rows if r["classes"][c]) == 1 for c in range(10))  # each class wholly in one shard


def test_a_quantity_split_at_a_tiny_beta_names_the_flags_to_change(capsys, fashion_mnist_dir) -> None:
    code = main(["split", "--split", "quantity", "--beta", "1e-300", "--num-clients", "3", "--max-images", "600", "--data-root", str(fashion_mnist_dir)])

    assert code == 2
    assert capsys.readouterr().err == (
        "feddiff split: error: 'quantity' split: 1000 Dirichlet draws at beta 1e-300 each left one of the 3 clients with fewer "
        "than 10 images; raise the concentration (--beta) or lower the number of clients (--num-clients)\n"
    )


def test_the_old_spelling_of_a_flag_still_works_with_a_one_line_notice(capsys) -> None:
    assert main(["strategies", "--model", "tiny", "--clients", "3", "--rounds", "2", "--json"]) == 0

    out, err = capsys.readouterr()
    assert err == "feddiff strategies: notice: --clients is deprecated, it is spelled --num-clients now\n"
    assert all(r["clients"] == 3 for r in json.loads(out))


@pytest.mark.parametrize(
    ("argv", "unknown"),
    [
        # once read as --clients-per-round 3 and --client-index 1; the bad --rounds and --num-clients stop them
        # there, where the flag was taken
        (["coordinator", "--clients", "3", "--rounds", "0", "--insecure"], "--clients 3"),
        (["worker", "--client", "1", "--num-clients", "0", "--coordinator", "127.0.0.1:1", "--insecure"], "--client 1"),
        (["split", "--num", "2"], "--num 2"),
        (["split", "--bogus", "1"], "--bogus 1"),
    ],
)
def test_a_flag_is_never_shortened_and_an_unknown_one_is_refused_with_its_commands_usage(
    argv: list[str], unknown: str, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as excinfo:
        main(argv)

    err = capsys.readouterr().err
    assert excinfo.value.code == 2
    assert err.startswith(f"usage: feddiff {argv[0]} ")
    assert err.endswith(f"feddiff {argv[0]}: error: unrecognized arguments: {unknown}\n")


def test_the_worker_takes_the_old_spelling_of_k_too(capsys) -> None:
    code = main(["worker", "--clients", "3", "--client-index", "5", "--coordinator", "127.0.0.1:1", "--insecure"])

    assert code == 2  # refused for the index, after --clients 3 was read as --num-clients 3
    assert capsys.readouterr().err == (
        "feddiff worker: notice: --clients is deprecated, it is spelled --num-clients now\n"
        "feddiff worker: error: --client-index 5 is not a shard of --num-clients 3: give 0..2, or --num-clients above it\n"
    )


@pytest.mark.parametrize("command", ["sample", "evaluate", "export"])
def test_a_checkpoint_that_is_not_safetensors_is_refused_in_one_line_naming_it(command: str, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "final.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # truncated: a header length and too few bytes
    given = {
        "sample": ["--checkpoint", str(bad), "--out", str(tmp_path / "grid.png")],
        "evaluate": ["--checkpoint", str(bad)],
        "export": ["--checkpoint", str(bad), "--out", str(tmp_path / "out.safetensors")],
    }[command]

    code = main([command, *given, "--model", "tiny"])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"feddiff {command}: error: --checkpoint {bad}: not a safetensors file (") and err.count("\n") == 1, err


def test_certs_into_a_path_that_is_a_file_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    taken = tmp_path / "taken"
    taken.write_text("keep me")

    code = main(["certs", "--out-dir", str(taken)])

    assert code == 2
    err = capsys.readouterr().err
    assert err == f"feddiff certs: error: --out-dir {str(taken)!r} is a file, not a folder\n", err
    assert taken.read_text() == "keep me"


def test_certs_again_keeps_every_key_pair_already_issued_and_issues_the_missing_ones(tmp_path: Path, capsys) -> None:
    out = tmp_path / "c3"
    assert main(["certs", "--out-dir", str(out), "--coordinator-host", "coord.example.org", "--worker", "h1"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    assert main(["certs", "--out-dir", str(out), "--worker", "h1", "--worker", "h2"]) == 0

    printed = capsys.readouterr()
    assert printed.out == f"{out / 'h2.crt'}\n"
    assert printed.err == f"{out}: kept ca, coordinator, h1 (never replaced); issued h2\n"
    assert {name: (out / name).read_bytes() for name in before} == before
    assert (out / "h2.key").is_file()


def test_certs_refuses_a_coordinator_host_that_the_kept_certificate_lacks(tmp_path: Path, capsys) -> None:
    out = tmp_path / "c3"
    assert main(["certs", "--out-dir", str(out), "--coordinator-host", "coord.example.org"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    code = main(["certs", "--out-dir", str(out), "--coordinator-host", "other.example.org", "--worker", "h2"])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("feddiff certs: error: --coordinator-host 'other.example.org': the kept coordinator certificate ") and err.count("\n") == 1, err
    assert str(out / "coordinator.crt") in err and "--out-dir" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "nothing is issued after a refusal"


def test_certs_refuses_a_certificate_whose_key_is_gone(tmp_path: Path, capsys) -> None:
    out = tmp_path / "c3"
    assert main(["certs", "--out-dir", str(out), "--worker", "w1"]) == 0
    capsys.readouterr()
    (out / "w1.key").unlink()
    kept = (out / "w1.crt").read_bytes()

    assert main(["certs", "--out-dir", str(out), "--worker", "w1"]) == 2

    err = capsys.readouterr().err
    assert "w1.crt is there without w1.key" in err and err.count("\n") == 1, err
    assert (out / "w1.crt").read_bytes() == kept


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["coordinator", "--eval-samples", "1", "--insecure"],
            "--eval-samples = '1': expected an integer in 0..100000; an FD needs at least 2 samples (0 = no evaluation)",
        ),
        (["reproduce", "--samples", "1"], "--samples = '1': expected an integer in 2..100000"),
        (["reproduce", "--curve-samples", "1"], "--curve-samples = '1': expected an integer in 2..100000"),
    ],
)
def test_an_fd_of_one_sample_is_refused_at_start(argv: list[str], line: str, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may be written, and nothing is: the refusal comes first (before --resume
    # finds no run to resume, where a coordinator that took one sample would stop)

    code = main(argv)

    assert code == 2
    assert capsys.readouterr().err == f"feddiff {argv[0]}: error: {line}\n"
    assert list(tmp_path.iterdir()) == []


def test_split_with_a_missing_dataset_is_an_error(capsys, tmp_path) -> None:
    code = main(["split", "--data-root", str(tmp_path), "--json"])

    assert code == 2
    assert "not found" in capsys.readouterr().err


def test_split_with_a_missing_dataset_names_the_flag_the_folder_and_the_files(capsys, tmp_path) -> None:
    code = main(["split", "--data-root", str(tmp_path)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(
        f"feddiff split: error: Fashion-MNIST: train-images-idx3-ubyte.gz not found in {str(tmp_path)!r} (the data root: --data-root or FEDDIFF_FASHION_MNIST_DIR)"
    )
    assert "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz" in err
    assert "root=" not in err and err.count("\n") == 1


def test_python_dash_m_feddiff_runs(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "feddiff", "model-info", "--model", "tiny", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["total"] == 143_951


def test_unknown_command_exits_with_usage() -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["frobnicate"])

    assert excinfo.value.code == 2


def test_every_option_of_every_command_says_what_it_does() -> None:
    commands = subcommands(build_parser())

    wordless = [
        f"feddiff {name} {'/'.join(action.option_strings)}"
        for name, parser in commands.items()
        for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]

    assert set(commands) == set(COMMANDS)
    assert wordless == []
    assert all(parser.format_help() for parser in commands.values())  # each help renders (a stray % in one would not)


def _help(command: str) -> str:
    return " ".join(subcommands(build_parser())[command].format_help().split())


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        ("coordinator", "--round-deadline"),
        ("coordinator", "--upload-idle-timeout"),
        ("coordinator", "--heartbeat-interval"),
        ("coordinator", "--final-save-timeout"),
        ("worker", "--wait-timeout"),
        ("worker", "--collective-timeout"),
        ("status", "--timeout"),
        ("health", "--timeout"),
    ],
)
def test_a_durations_help_gives_its_range_in_seconds_a_user_would_give(command: str, flag: str) -> None:
    help_text = _help(command)

    entry = help_text.split(f"{flag} {flag[2:].upper().replace('-', '_')} ", 1)[1]
    assert ": more than 0 s, up to 604800 s (a week), default " in entry.split(" --", 1)[0]
    assert "9223372036" not in help_text and "4294967.295" not in help_text


@pytest.mark.parametrize("command", ["worker", "simulate", "reproduce"])
def test_threads_help_says_where_its_top_comes_from_and_no_compile_is_not_listed_twice(command: str) -> None:
    import os

    help_text = _help(command)

    assert f"CPU threads for torch (0 = torch's default): an integer in 0..{os.cpu_count()} (this machine's CPUs), default 0" in help_text
    assert "--no-compile" not in help_text and "--compile {auto,on,off}" in help_text


def test_no_compile_still_works_as_the_old_spelling_of_compile_off(capsys: pytest.CaptureFixture[str]) -> None:
    from worker.config import from_args

    args = build_parser().parse_args(["worker", "--coordinator", "127.0.0.1:1", "--client-index", "0", "--no-compile"])

    assert from_args(args).speed.compile == "off"
    assert capsys.readouterr().err == "feddiff worker: notice: --no-compile is deprecated, it is spelled --compile off now\n"


@pytest.mark.parametrize(
    ("argv", "old", "new", "setting"),
    [
        (["simulate", "--out", "{tmp}"], "--out", "--out-dir", "out_dir"),
        (["reproduce", "--out", "{tmp}"], "--out", "--out-dir", "out_dir"),
        (["certs", "--out", "{tmp}"], "--out", "--out-dir", "out_dir"),
        (["export", "--checkpoint-dir", "{tmp}", "--out", "m.safetensors"], "--checkpoint-dir", "--checkpoint", "checkpoint"),
        (["sample", "--checkpoint", "{tmp}", "--n", "4"], "--n", "--samples", "samples"),
    ],
)
def test_a_renamed_flags_old_spelling_still_works_with_a_notice_naming_the_new(
    argv: list[str], old: str, new: str, setting: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from feddiff.models_cli import ExportConfig, SampleConfig
    from feddiff.reproduce_cli import ReproduceSettings
    from feddiff.simulate_cli import SimulateConfig
    from feddiff.system_cli import CertsConfig
    from service import flags

    configs = {"simulate": SimulateConfig, "reproduce": ReproduceSettings, "certs": CertsConfig, "export": ExportConfig, "sample": SampleConfig}
    argv = [str(tmp_path) if a == "{tmp}" else a for a in argv]

    built: object = flags.build(configs[argv[0]], build_parser().parse_args(argv))

    assert capsys.readouterr().err == f"feddiff {argv[0]}: notice: {old} is deprecated, it is spelled {new} now\n"
    assert str(getattr(built, setting)) == argv[argv.index(old) + 1]


def test_the_help_lists_each_flag_by_its_spelling_of_today_only() -> None:
    """An old spelling still works (the test above) but is not listed: not --clients beside --num-clients, not
    --no-compile beside --compile."""
    listed = {
        name: {s for line in parser.format_help().splitlines() if line.startswith("  -") for s in line.replace(",", " ").split() if s.startswith("--")}
        for name, parser in subcommands(build_parser()).items()
    }
    old = {name: {s for action in parser._actions for s in getattr(action, "old", ())} for name, parser in subcommands(build_parser()).items()}

    assert {name: listed[name] & old[name] for name in listed if listed[name] & old[name]} == {}
    assert {"--clients", "--no-compile"} <= old["simulate"] and "--num-clients" in listed["simulate"] and "--compile" in listed["simulate"]
    assert {"--out", "--checkpoint-dir", "--n"} <= old["export"] | old["sample"] | old["certs"]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["simulate", "--out-dir", ""], "--out-dir = '': expected a folder path"),
        (["simulate", "--init-from", ""], "--init-from = '': expected a readable file or folder; the flag is given empty"),
        (
            ["simulate", "--out-dir", "{out}", "--clients-per-round", "9", "--num-clients", "2"],
            "--clients-per-round 9 is more than --num-clients 2: a round samples its clients from those K; give at most K (0: every client)",
        ),
        (
            ["simulate", "--out-dir", "{out}", "--clients-per-round", "6"],
            "--clients-per-round 6 is more than --num-clients 5 (the default): a round samples its clients from those K; give at most K (0: every client)",
        ),
        (
            ["reproduce", "--out-dir", "{out}", "--strategies", "udec,,full"],
            "--strategies = 'udec,,full': expected a comma list of 'centralised', 'full', 'usplit', 'udec', 'ulatdec'; an empty item before a comma",
        ),
        (
            ["reproduce", "--out-dir", "{out}", "--splits", ",iid"],
            "--splits = ',iid': expected a comma list of 'iid', 'quantity', 'label'; an empty item before a comma",
        ),
    ],
)
def test_simulate_and_reproduce_refuse_an_empty_value_and_settings_that_cannot_go_together(argv: list[str], line: str, tmp_path: Path, capsys) -> None:
    argv = [str(tmp_path / "out") if a == "{out}" else a for a in argv]

    code = main(argv)

    assert code == 2
    assert capsys.readouterr() == ("", f"feddiff {argv[0]}: error: {line}\n")
    assert not (tmp_path / "out").exists()


def test_health_takes_an_empty_service_its_help_says_is_the_server() -> None:
    from feddiff.system_cli import HealthConfig
    from service import flags

    args = build_parser().parse_args(["health", "--address", "127.0.0.1:1", "--insecure", "--service", ""])

    assert flags.build(HealthConfig, args).service == ""
    assert "('' = the server)" in " ".join(subcommands(build_parser())["health"].format_help().split())


@pytest.fixture
def plain_text_server():
    """A gRPC server on a free loopback port, in plain text, with the health service only: its address."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["status", "--tls-ca", "{ca}"],
            "UNAVAILABLE: the TLS handshake failed (the server did not answer in TLS): if it serves plain text, give --insecure instead of --tls-ca",
        ),
        (
            ["health", "--tls-ca", "{ca}"],
            "UNAVAILABLE: the TLS handshake failed (the server did not answer in TLS): if it serves plain text, give --insecure instead of --tls-ca",
        ),
        (["health", "--insecure", "--service", "nope"], "NOT_FOUND: the server has no health service 'nope' (leave out --service for the server's own)"),
        (
            ["status", "--insecure"],
            "UNIMPLEMENTED: the gRPC server there is not a feddiff coordinator (no status service); give the coordinator's --listen address",
        ),
    ],
)
def test_a_failed_call_of_health_or_status_is_one_line_that_says_what_to_try(argv: list[str], line: str, pki: Path, plain_text_server: str) -> None:
    argv = [str(pki / "ca.crt") if a == "{ca}" else a for a in argv]
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}

    done = subprocess.run(
        [sys.executable, "-m", "feddiff", *argv, "--address", plain_text_server, "--timeout", "10"],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"{plain_text_server}: {line}\n"


@pytest.mark.parametrize("command", ["status", "health"])
def test_a_call_to_an_http_server_says_it_does_not_speak_grpc(command: str) -> None:
    """The coordinator's metrics port given as its gRPC address, the likeliest slip of the two ports it opens."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "feddiff", command, "--insecure", "--address", address, "--timeout", "10"],
            check=False, capture_output=True, text=True, cwd=REPO, timeout=60,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"{address}: UNAVAILABLE: the server there does not speak gRPC (an HTTP/1 server, such as a /metrics port?); give the coordinator's --listen address\n"
    )


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (None, "--results '{results}': cannot read it (No such file or directory); nothing rendered"),
        ("hello, these are my notes", "--results {results}, line 1: not a results line (not JSON: Expecting value); nothing rendered"),
        ('{"protocol": "quick"}\n', "--results {results}, line 1: not a results line (KeyError: "),
        ("\n[1, 2]\n", "--results {results}, line 2: not a results line (TypeError: a JSON list, not an object); nothing rendered"),
    ],
    ids=["missing", "text", "another-json-object", "json-list"],
)
def test_reproduce_render_of_a_file_that_is_no_results_file_writes_nothing(content: str | None, line: str, tmp_path: Path, capsys) -> None:
    results, docs = tmp_path / "results.jsonl", tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("the table of last week\n")
    if content is not None:
        results.write_text(content)

    code = main(["reproduce", "--render", "--results", str(results), "--docs", str(docs)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"feddiff reproduce: error: {line.format(results=results)}") and err.count("\n") == 1, err
    assert [p.name for p in docs.iterdir()] == ["results.md"] and (docs / "results.md").read_text() == "the table of last week\n"


@pytest.mark.parametrize(
    ("argv", "target", "line"),
    [
        (
            ["reproduce", "--protocol", "mini"],
            "fedcore.experiments.reproduce.reproduce",
            "; its finished rounds and cells are saved: the same command goes on from the last one",
        ),
        (
            ["simulate", "--model", "tiny"],
            "fedcore.experiments.simulation.Simulation.create",
            "; its finished rounds are checkpointed: the same command with --resume goes on from the last one",
        ),
        (["split"], "fedcore.data.shards.load_training_pool", ""),
    ],
    ids=["reproduce", "simulate", "split"],
)
def test_ctrl_c_ends_a_command_with_one_line_saying_how_to_go_on(argv: list[str], target: str, line: str, tmp_path: Path, monkeypatch, capsys) -> None:
    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    out = ["--out-dir", str(tmp_path / "run")] if argv[0] != "split" else []

    code = main([*argv, *out])

    err = capsys.readouterr().err
    assert code == 130
    assert err == f"feddiff {argv[0]}: interrupted{line}\n"


def test_reproduce_render_never_drops_a_measurement_the_docs_hold(tmp_path: Path, capsys) -> None:
    """The committed results as the docs' copy; a results file with only its first line would replace them."""
    committed = (REPO / "docs" / "results.jsonl").read_text().splitlines(keepends=True)
    docs, results = tmp_path / "docs", tmp_path / "results.jsonl"
    docs.mkdir()
    (docs / "results.jsonl").write_text("".join(committed))
    (docs / "results.md").write_text("the table of last week\n")
    results.write_text(committed[0])
    second = json.loads(committed[1])

    refused = main(["reproduce", "--render", "--results", str(results), "--docs", str(docs)])
    err = capsys.readouterr().err
    kept = sorted((f.name, f.read_text()) for f in docs.iterdir())
    results.write_text("".join(reversed(committed)))  # every measurement, in another order
    rendered = main(["reproduce", "--render", "--results", str(results), "--docs", str(docs)])

    assert refused == 2 and err.count("\n") == 1
    assert kept == [("results.jsonl", "".join(committed)), ("results.md", "the table of last week\n")]
    assert err.startswith(
        f"feddiff reproduce: error: --docs {str(docs)!r}: its results.jsonl holds {len(committed) - 1} measurements that --results "
        f"{str(results)!r} lacks (e.g. {second['protocol']} {second['cell']}, seed {second['seed']}): rendering would drop them"
    ), err
    assert rendered == 0 and len((docs / "results.jsonl").read_text().splitlines()) == len(committed)
    assert "the table of last week" not in (docs / "results.md").read_text()


@pytest.mark.parametrize("render", [True, False])
def test_reproduce_docs_that_is_a_file_is_refused_in_one_line(render: bool, tmp_path: Path, capsys) -> None:
    taken = tmp_path / "docs"
    taken.write_text("keep me")
    (tmp_path / "results.jsonl").write_text("")

    code = main(
        ["reproduce", *(["--render"] if render else []), "--results", str(tmp_path / "results.jsonl"), "--docs", str(taken), "--out-dir", str(tmp_path / "run")]
    )

    assert code == 2
    assert capsys.readouterr().err == f"feddiff reproduce: error: --docs {str(taken)!r} is a file, not a folder\n"
    assert taken.read_text() == "keep me" and not (tmp_path / "run").exists()
