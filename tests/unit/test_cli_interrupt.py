"""Ctrl-C at any point of the command line's life exits with 130 and no traceback."""

from __future__ import annotations

from splitserve import cli


def _interrupt(*_args, **_kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_while_the_subcommands_are_imported(monkeypatch):
    monkeypatch.setattr(cli, "build_parser", _interrupt)
    assert cli.main(["serve"]) == 130


def test_ctrl_c_while_a_command_runs(monkeypatch):
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    args = parser.parse_args(["drain", "d0"])
    monkeypatch.setattr(parser, "parse_args", lambda argv: args)
    args.run = _interrupt
    assert cli.main(["drain", "d0"]) == 130


def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["drain", "d0"])
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: args)

    def bad(_args):
        raise ValueError("--deadline must be positive")

    args.run = bad
    assert cli.main(["drain", "d0"]) == 2
    assert capsys.readouterr().err.strip() == "splitserve drain: error: --deadline must be positive"
