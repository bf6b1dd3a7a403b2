"""Every file in serving_configs/ is a config that `vllm serve --config FILE` accepts, as vLLM parses it.

The parser is the one `vllm serve` builds (vLLM's own `ServeSubcommand`), so a key that is no `vllm serve`
option, or a value of the wrong type, fails here as it would when a person starts the server.
"""

import re
from pathlib import Path

import pytest
import yaml

from vllm_kbit.config import DEFAULT_BITS, KbitConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "serving_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def vllm_parsers():
    """(the top-level `vllm` parser with only the `serve` subcommand, the `serve` subparser), built as
    vLLM's CLI builds them: `--config` is expanded by the top-level parser's parse_args."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    serve = ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    return parser, serve


def parse_serve(path: Path):
    return vllm_parsers()[0].parse_args(["serve", "MODEL", "--config", str(path)])


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_expected_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"smollm2-kbit.yaml", "llama3-8b-kbit4.yaml", "llama3-8b-kbit2.yaml",
            "qwen3-30b-a3b-kbit4.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_key_is_a_vllm_serve_option(path):
    options = vllm_parsers()[1]._option_string_actions
    unknown = [key for key in load(path) if f"--{key}" not in options]
    assert not unknown, f"{path.name}: not `vllm serve` options: {unknown}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_vllm_parses_each_value_to_the_value_written(path):
    """A value of the wrong type (e.g. "0.9" quoted) would parse to something other than what is written."""
    config = load(path)
    args = parse_serve(path)
    assert args.model_tag == "MODEL"
    for key, written in config.items():
        parsed = getattr(args, key.replace("-", "_"))
        if isinstance(parsed, list) and not isinstance(written, list):  # nargs="+" options, e.g. served-model-name
            parsed = parsed[0] if len(parsed) == 1 else parsed
        assert parsed == written and type(parsed) is type(written), f"{path.name}: {key}: {written!r} -> {parsed!r}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_serve_kbit_with_the_bits_in_their_name(path):
    from vllm.engine.arg_utils import AsyncEngineArgs

    engine_args = AsyncEngineArgs.from_cli_args(parse_serve(path))
    assert engine_args.quantization == "kbit"
    named = re.search(r"kbit(\d)", path.stem)
    want_bits = int(named.group(1)) if named else DEFAULT_BITS
    overrides = (engine_args.hf_overrides or {}).get("quantization_config")
    # Load-time quantization takes k from hf-overrides, else the default: a k != 4 config must carry it.
    bits = DEFAULT_BITS if overrides is None else KbitConfig.from_config(overrides).bits
    assert bits == want_bits, f"{path.name} quantizes a bf16 checkpoint to k={bits}, its name says k={want_bits}"
    if overrides is not None:
        assert overrides["quant_method"] == "kbit"
