from click.testing import CliRunner

from prunerzero.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def field(output, name):
    return next(line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith(name + ":"))


def test_simplify_shows_the_issue_example_equal_to_wanda():
    r = run("simplify", "exp(log(sqrt(sqr(W))))*X")
    assert r.exit_code == 0, r.output
    assert field(r.output, "simplified") == "abs(W)*X"
    wanda = run("simplify", "wanda")
    assert field(r.output, "canonical") == field(wanda.output, "canonical")
    assert "exp_log" in r.output


def test_metrics_lists_the_catalog():
    r = run("metrics", "--operators")
    assert r.exit_code == 0
    for name in ("magnitude", "wanda", "ria", "gblm", "pruner-zero", "mms_row", "colsum"):
        assert name in r.output


def test_bad_metric_exits_2_with_a_message():
    r = run("simplify", "abs(W")
    assert r.exit_code == 2
    assert "unbalanced parentheses" in r.output


def test_every_option_of_every_command_has_help_text():
    import click
    from prunerzero.cli import main
    bare = [(name, p.opts[0]) for name, cmd in main.commands.items() for p in cmd.params
            if isinstance(p, click.Option) and not p.help]
    assert bare == []
