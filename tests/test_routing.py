"""The routing grammar (link_kernel.routing): routing comments, %link lines, resolve().

Pure and fast: no kernel, no I/O. Tables first, then hypothesis properties.
"""

from __future__ import annotations

import keyword
import math
import re

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from link_kernel.errors import LinkError, RoutingError, UnknownTargetError
from link_kernel.routing import (
    COMMANDS,
    LOCAL,
    OPTIONS,
    Cell,
    Command,
    Route,
    parse,
    parse_targets,
    resolve,
)


def lines_of(text: str) -> list[str]:
    """The lines as Python and IPython count them, a last unterminated one included."""
    lines = (text + ".").splitlines()
    lines[-1] = lines[-1][:-1]
    return lines


def line_count(text: str) -> int:
    return len(lines_of(text))


def route_of(first_line: str) -> Route:
    return parse(first_line + "\nx = 1\n").route


def routed(*targets: str, **fields) -> Route:
    """The Route a routing comment naming ``targets`` with ``fields`` parses to."""
    return Route(targets=targets, commented=True, **fields)


def refused(cell: str) -> RoutingError:
    with pytest.raises(RoutingError) as info:
        parse(cell)
    return info.value


# -- no routing comment -------------------------------------------------------------

PLAIN_CELLS = [
    "",
    "\n",
    "x = 1",
    "x = 1\n",
    "print('hi')\r\nprint('there')\r\n",
    "# an ordinary comment\nx = 1",
    "# linked lists are slow\n",
    "# see the link: https://example.org\n",
    "## link: gpu\n",
    "#! link: gpu\n",
    "x = 1  # link: gpu\n",
    "# link gpu\n",
    "s = '%link status'\n",
    "  %link status\n",
    "x = 1\n# link: gpu\n",
    "\n# link: gpu\nx = 1\n",
    "%%time\nx = 1\n",
    "%linkfoo status\n",
    "%links\n",
    "\t\n  \n",
]


@pytest.mark.parametrize("cell", PLAIN_CELLS)
def test_a_cell_without_routing_goes_to_the_default_unchanged(cell):
    parsed = parse(cell)
    assert parsed == Cell(route=Route(), code=cell, commands=())
    assert parsed.route.targets == ()
    assert parsed.route.commented is False
    assert parsed.code is cell


def test_the_default_route_means_detect_and_sync_everything():
    route = Route()
    assert (route.targets, route.keep, route.kernel) == ((), False, None)
    assert (route.inputs, route.outputs, route.files, route.timeout) == (None, None, True, None)
    assert route.resources == ()
    assert not route.is_local


def test_second_line_comment_is_code_even_after_a_blank_first_line():
    cell = "\n# link: gpu\n"
    assert parse(cell).route == Route()


# -- DESIGN.md and module docstring examples ----------------------------------------

EXAMPLES = [
    ("# link: gpu", routed("gpu")),
    ("# link: gpu|tesla|local", routed("gpu", "tesla", "local")),
    ("# link: gpu keep", routed("gpu", keep=True)),
    ("# link: gpu kernel=torch-2", routed("gpu", kernel="torch-2")),
    (
        "# link: gpu in=df,model out=model",
        routed("gpu", inputs=("df", "model"), outputs=("model",)),
    ),
    ("# link: gpu files=off timeout=3600", routed("gpu", files=False, timeout=3600.0)),
    (
        "# link: cluster gpus=1 cpus=8 mem=32G time=2:00:00 partition=gpu",
        routed(
            "cluster",
            resources=(
                ("gpus", "1"),
                ("cpus", "8"),
                ("mem", "32G"),
                ("time", "2:00:00"),
                ("partition", "gpu"),
            ),
        ),
    ),
    ("# link: files=off", routed(files=False)),
    ("# link: local", routed("local")),
]


@pytest.mark.parametrize(("line", "expected"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_documented_examples(line, expected):
    cell = f"{line}\nresult = train(df)\n"
    parsed = parse(cell)
    assert parsed.route == expected
    assert parsed.code == cell, "the routing comment stays in the code"
    assert parsed.commands == ()


def test_is_local_only_for_the_single_target_local():
    assert route_of("# link: local").is_local
    assert not route_of("# link: local|gpu").is_local
    assert not route_of("# link: gpu").is_local
    assert route_of("# link: gpu").with_targets([LOCAL]).is_local


# -- whitespace -----------------------------------------------------------------------

WHITESPACE = [
    "# link: gpu",
    "#link:gpu",
    "#  link :  gpu",
    "# link:gpu   ",
    "   # link: gpu",
    "\t#\tlink\t:\tgpu\t",
    "# link:\tgpu",
    "# link :gpu",
]


@pytest.mark.parametrize("line", WHITESPACE, ids=repr)
def test_whitespace_variants_of_the_comment(line):
    assert route_of(line) == routed("gpu")


@pytest.mark.parametrize("line", WHITESPACE, ids=repr)
def test_crlf_line_endings(line):
    cell = f"{line}\r\nx = 1\r\n"
    parsed = parse(cell)
    assert parsed.route == routed("gpu")
    assert parsed.code == cell


def test_crlf_on_a_one_line_cell_with_options():
    assert parse("# link: gpu files=off\r\n").route == routed("gpu", files=False)


def test_tabs_and_runs_of_spaces_between_options():
    line = "# link:\tgpu \t keep\t\tfiles=off   timeout=5"
    assert route_of(line) == routed("gpu", keep=True, files=False, timeout=5.0)


def test_a_lone_carriage_return_ends_the_first_line():
    # Python and IPython both end a line at '\r'; the comment ends there too.
    parsed = parse("# link: gpu\rx = 1")
    assert parsed.route == routed("gpu")
    assert parsed.code == "# link: gpu\rx = 1"


# -- chains ---------------------------------------------------------------------------

GOOD_CHAINS = [
    ("gpu", ("gpu",)),
    ("gpu|local", ("gpu", "local")),
    ("local|gpu", ("local", "gpu")),
    ("c|b|a", ("c", "b", "a")),
    ("gpu | tesla | local", ("gpu", "tesla", "local")),
    ("gpu |tesla", ("gpu", "tesla")),
    (
        "node-1.example.org|user@host|a_b|x+y|9lives",
        ("node-1.example.org", "user@host", "a_b", "x+y", "9lives"),
    ),
]


@pytest.mark.parametrize(("chain", "expected"), GOOD_CHAINS)
def test_chains_keep_their_order(chain, expected):
    assert route_of(f"# link: {chain}").targets == expected


BAD_CHAINS = [
    ("gpu|gpu", "'gpu' appears twice"),
    ("gpu|tesla|gpu", "'gpu' appears twice"),
    ("gpu||tesla", "empty target"),
    ("gpu|", "empty target"),
    ("|gpu", "empty target"),
    ("gpu | ", "empty target"),
    ("gp!u", "bad target name 'gp!u'"),
    ("gpu|te$la", "bad target name 'te$la'"),
    ("-gpu", "bad target name '-gpu'"),
    (".hidden", "bad target name '.hidden'"),
    ("gpü", "bad target name 'gpü'"),
    ("gpu,tesla", "bad target name 'gpu,tesla'"),
]


@pytest.mark.parametrize(("chain", "fault"), BAD_CHAINS)
def test_bad_chains_are_refused(chain, fault):
    err = refused(f"# link: {chain}\nx = 1")
    assert fault in str(err)


@pytest.mark.parametrize(("chain", "expected"), GOOD_CHAINS)
def test_parse_targets_alone(chain, expected):
    assert parse_targets(chain) == expected


@pytest.mark.parametrize(("chain", "fault"), [*BAD_CHAINS, ("", "empty target")])
def test_parse_targets_alone_refuses(chain, fault):
    with pytest.raises(RoutingError, match=re.escape(fault)):
        parse_targets(chain)


def test_a_second_bare_target_is_an_unknown_option_that_suggests_a_chain():
    err = refused("# link: gpu tesla")
    assert "unknown option 'tesla'" in str(err)
    assert "gpu|tesla" in str(err)


# -- options --------------------------------------------------------------------------

GOOD_OPTIONS = [
    ("keep", {"keep": True}),
    ("kernel=python3", {"kernel": "python3"}),
    ("kernel=torch-2", {"kernel": "torch-2"}),
    ("kernel=conda-env.py3_11", {"kernel": "conda-env.py3_11"}),
    ("in=df", {"inputs": ("df",)}),
    ("in=df,model,_x,x2", {"inputs": ("df", "model", "_x", "x2")}),
    ("in=données", {"inputs": ("données",)}),
    ("in=match,type,_", {"inputs": ("match", "type", "_")}),
    ("in=", {"inputs": ()}),
    ("out=model", {"outputs": ("model",)}),
    ("out=", {"outputs": ()}),
    ("in= out=", {"inputs": (), "outputs": ()}),
    ("files=on", {"files": True}),
    ("files=off", {"files": False}),
    ("timeout=3600", {"timeout": 3600.0}),
    ("timeout=0.5", {"timeout": 0.5}),
    ("timeout=1e3", {"timeout": 1000.0}),
    ("timeout=+7", {"timeout": 7.0}),
    ("gpus=0", {"resources": (("gpus", "0"),)}),
    ("gpus=4", {"resources": (("gpus", "4"),)}),
    ("cpus=1", {"resources": (("cpus", "1"),)}),
    ("cpus=64", {"resources": (("cpus", "64"),)}),
    ("mem=32G", {"resources": (("mem", "32G"),)}),
    ("mem=512m", {"resources": (("mem", "512m"),)}),
    ("mem=1T", {"resources": (("mem", "1T"),)}),
    ("mem=4096", {"resources": (("mem", "4096"),)}),
    ("time=30", {"resources": (("time", "30"),)}),
    ("time=30:00", {"resources": (("time", "30:00"),)}),
    ("time=2:00:00", {"resources": (("time", "2:00:00"),)}),
    ("time=1-12", {"resources": (("time", "1-12"),)}),
    ("time=1-12:30:00", {"resources": (("time", "1-12:30:00"),)}),
    ("partition=gpu", {"resources": (("partition", "gpu"),)}),
    ("partition=long_q.a-1", {"resources": (("partition", "long_q.a-1"),)}),
    ("mem=8G gpus=2", {"resources": (("mem", "8G"), ("gpus", "2"))}),
]


@pytest.mark.parametrize(("options", "fields"), GOOD_OPTIONS, ids=[o[0] for o in GOOD_OPTIONS])
def test_good_options(options, fields):
    assert route_of(f"# link: gpu {options}") == routed("gpu", **fields)


BAD_OPTIONS = [
    ("keep=yes", "'keep' is a flag"),
    ("keep=", "'keep' is a flag"),
    ("keep keep", "option 'keep' given twice"),
    ("kernel", "option 'kernel' needs a value"),
    ("kernel=", "kernel=''"),
    ("kernel=torch 2", "unknown option '2'"),
    ("kernel=py$", "kernel='py$'"),
    ("in", "option 'in' needs a value"),
    ("in=1df", "bad name '1df'"),
    ("in=df,,model", "bad name ''"),
    ("in=df,", "bad name ''"),
    ("in=,", "bad name ''"),
    ("in=class", "bad name 'class'"),
    ("in=None", "bad name 'None'"),
    ("in=df.x", "bad name 'df.x'"),
    ("in=a-b", "bad name 'a-b'"),
    ("in=df,df", "'df' appears twice"),
    ("out=x,1", "bad name '1'"),
    ("out=def", "bad name 'def'"),
    ("files=yes", "files='yes': use files=on or files=off"),
    ("files=", "files=''"),
    ("files=ON", "files='ON'"),
    ("files=true", "files='true'"),
    ("files", "option 'files' needs a value"),
    ("timeout=0", "timeout='0'"),
    ("timeout=0.0", "timeout='0.0'"),
    ("timeout=-1", "timeout='-1'"),
    ("timeout=nan", "timeout='nan'"),
    ("timeout=NaN", "timeout='NaN'"),
    ("timeout=inf", "timeout='inf'"),
    ("timeout=-inf", "timeout='-inf'"),
    ("timeout=infinity", "timeout='infinity'"),
    ("timeout=1e999", "timeout='1e999'"),
    ("timeout=1e-999", "timeout='1e-999'"),
    ("timeout=abc", "timeout='abc'"),
    ("timeout=5s", "timeout='5s'"),
    ("timeout=", "timeout=''"),
    ("timeout", "option 'timeout' needs a value"),
    ("gpus=-1", "gpus='-1'"),
    ("gpus=one", "gpus='one'"),
    ("gpus=1.5", "gpus='1.5'"),
    ("gpus=²", "gpus='²'"),
    ("gpus=", "gpus=''"),
    ("cpus=0", "cpus='0'"),
    ("cpus=²", "cpus='²'"),
    ("cpus=٣", "cpus='٣'"),
    ("cpus=eight", "cpus='eight'"),
    ("mem=32GB", "mem='32GB'"),
    ("mem=G", "mem='G'"),
    ("mem=-1G", "mem='-1G'"),
    ("mem=32\u212a", "mem='32\u212a'"),  # KELVIN SIGN is not 'K'
    ("mem=", "mem=''"),
    ("time=2h", "time='2h'"),
    ("time=1:2:3:4", "time='1:2:3:4'"),
    ("time=:30", "time=':30'"),
    ("time=", "time=''"),
    ("partition=", "partition=''"),
    ("partition=a/b", "partition='a/b'"),
    ("gpus", "option 'gpus' needs a value"),
]


@pytest.mark.parametrize(("options", "fault"), BAD_OPTIONS, ids=[o[0] for o in BAD_OPTIONS])
def test_bad_options_are_refused(options, fault):
    err = refused(f"# link: gpu {options}\nx = 1")
    assert fault in str(err)


@pytest.mark.parametrize("option", OPTIONS)
def test_any_option_given_twice_is_refused(option):
    value = {
        "keep": "keep",
        "kernel": "kernel=python3",
        "in": "in=a",
        "out": "out=a",
        "files": "files=on",
        "timeout": "timeout=1",
        "gpus": "gpus=1",
        "cpus": "cpus=1",
        "mem": "mem=1G",
        "time": "time=1",
        "partition": "partition=p",
        "name": "name=a",
        "after": "after=a",
        "cache": "cache=off",
    }[option]
    named = "name=c " if option in ("after", "cache") else ""
    err = refused(f"# link: gpu {named}{value} {value}")
    assert f"option {option!r} given twice" in str(err)


def test_options_given_twice_with_different_values_are_refused():
    assert "given twice" in str(refused("# link: gpu files=on files=off"))


@pytest.mark.parametrize(
    "token", ["colour=red", "keeep", "kernal=py3", "gpu=1", "=5", "IN=df", "Keep", "--keep"]
)
def test_unknown_option_lists_every_valid_option(token):
    err = refused(f"# link: gpu {token}")
    message = str(err)
    assert "unknown option" in message
    assert (
        "valid: after, cache, cpus, files, gpus, in, keep, kernel, mem, name, out, partition, "
        "time, timeout" in message
    )
    assert all(option in message for option in OPTIONS)


def test_unknown_option_close_to_a_valid_one_suggests_it():
    assert "did you mean 'keep'?" in str(refused("# link: gpu keeep"))
    assert "did you mean 'kernel'?" in str(refused("# link: gpu kernal=py3"))


def test_options_only_means_the_default_target():
    assert route_of("# link: files=off") == routed(files=False)
    assert route_of("# link: timeout=10 in=a") == routed(timeout=10.0, inputs=("a",))
    assert route_of("# link: files=off").targets == ()


@pytest.mark.parametrize(
    "line", ["# link: keep", "# link: keep files=off", "# link: files=off keep"]
)
def test_keep_needs_a_target(line):
    assert "'keep' needs a target" in str(refused(line))


def test_option_order_does_not_matter_but_resources_keep_theirs():
    a = route_of("# link: gpu keep timeout=5 mem=1G gpus=1")
    b = route_of("# link: gpu gpus=1 timeout=5 mem=1G keep")
    assert (a.keep, a.timeout) == (b.keep, b.timeout) == (True, 5.0)
    assert a.resources == (("mem", "1G"), ("gpus", "1"))
    assert b.resources == (("gpus", "1"), ("mem", "1G"))


@pytest.mark.parametrize("value", ["1", "3600", "0.001", "1e-3", "86400.5"])
def test_timeout_is_a_positive_finite_float(value):
    timeout = route_of(f"# link: gpu timeout={value}").timeout
    assert isinstance(timeout, float)
    assert timeout == float(value)
    assert timeout > 0 and math.isfinite(timeout)


# -- pipeline components -------------------------------------------------------------

COMPONENTS = [
    ("# link: name=load", routed(name="load")),
    ("# link: gpu name=train after=load,clean", routed("gpu", name="train", after=("load", "clean"))),
    (
        "# link: name=report after=train cache=off",
        routed(name="report", after=("train",), cache=False),
    ),
    ("# link: name=load cache=on", routed(name="load")),
    ("# link: gpu|local keep name=fit files=off", routed("gpu", "local", keep=True, name="fit", files=False)),
    ("# link: after=a,b name=c", routed(name="c", after=("a", "b"))),
    ("# link: name=_step2 after=données", routed(name="_step2", after=("données",))),
    ("# link: name=load # the raw data", routed(name="load")),
]


@pytest.mark.parametrize(("line", "expected"), COMPONENTS, ids=[c[0] for c in COMPONENTS])
def test_component_keys(line, expected):
    cell = f"{line}\ndf = load()\n"
    parsed = parse(cell)
    assert parsed.route == expected
    assert parsed.code == cell, "the routing comment stays in the code"


def test_a_comment_with_only_pipeline_keys_runs_on_the_default_target():
    route = route_of("# link: name=report after=train cache=off")
    assert route.targets == ()
    assert route.commented


def test_a_cell_without_a_name_is_no_component():
    assert (route_of("# link: gpu").name, route_of("# link: gpu").after) == (None, ())
    assert Route().cache is True


BAD_COMPONENTS = [
    ("name=1load", "name='1load': give the component a Python name, such as name=load"),
    ("name=", "name=''"),
    ("name=for", "name='for'"),
    ("name=a-b", "name='a-b'"),
    ("name=a.b", "name='a.b'"),
    ("name=a after=", "after='': name the parent components"),
    ("name=a after", "option 'after' needs a value"),
    ("name=a after=b,", "bad parent '' in after=b,"),
    ("name=a after=,b", "bad parent ''"),
    ("name=a after=b,,c", "bad parent ''"),
    ("name=a after=b c", "unknown option 'c'"),
    ("name=a after=2b", "bad parent '2b'"),
    ("name=a after=b,class", "bad parent 'class'"),
    ("name=a after=b,b", "parent 'b' appears twice in after=b,b"),
    ("name=a after=a", "component 'a' names itself in after="),
    ("name=a after=b,a", "cannot be its own parent"),
    ("after=load", "after= is for pipeline components: name this cell too"),
    ("cache=off", "cache= is for pipeline components"),
    ("name=a cache=no", "cache='no': use cache=on or cache=off"),
    ("name=a cache=OFF", "cache='OFF'"),
    ("name=a cache=", "cache=''"),
    ("name=a cache", "option 'cache' needs a value"),
    ("name=a name=b", "option 'name' given twice"),
    ("name=a after=b after=c", "option 'after' given twice"),
    ("nmae=a", "did you mean 'name'?"),
    ("parents=a", "unknown option 'parents'"),
]


@pytest.mark.parametrize(("options", "fault"), BAD_COMPONENTS, ids=[c[0] for c in BAD_COMPONENTS])
@pytest.mark.parametrize("target", ["", "gpu "])
def test_bad_component_keys_are_refused(target, options, fault):
    err = refused(f"# link: {target}{options}\nx = 1")
    assert fault in str(err)
    assert isinstance(err, RoutingError)


def test_a_bare_name_key_after_a_target_needs_a_value():
    # first, a bare word is a target, as '# link: files' is: a host may be called 'name'
    assert "option 'name' needs a value" in str(refused("# link: gpu name"))
    assert route_of("# link: name").targets == ("name",)


def test_an_unknown_key_lists_the_pipeline_keys_too():
    message = str(refused("# link: name=a parents=b"))
    assert all(key in message for key in ("name", "after", "cache"))


_COMPONENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True).filter(
    lambda n: not keyword.iskeyword(n)
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _COMPONENT,
    st.lists(_COMPONENT, max_size=4, unique=True),
    st.sampled_from([None, "on", "off"]),
    st.sampled_from(["", "gpu ", "gpu|local "]),
)
def test_any_well_formed_component_round_trips(name, parents, cache, target):
    assume(name not in parents)
    line = f"# link: {target}name={name}"
    if parents:
        line += " after=" + ",".join(parents)
    if cache:
        line += f" cache={cache}"
    route = route_of(line)
    assert (route.name, route.after, route.cache) == (name, tuple(parents), cache != "off")
    assert route.targets == tuple(target.strip().split("|")) if target else route.targets == ()


# -- empty comments and trailing comments ----------------------------------------------


@pytest.mark.parametrize(
    "line", ["# link:", "# link:   ", "#link:", "# link:\t", "# link: # nothing here", "# link:#"]
)
def test_an_empty_routing_comment_is_refused(line):
    err = refused(f"{line}\nx = 1")
    assert "empty routing comment" in str(err)
    assert "# link: gpu" in str(err)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("# link: gpu # the big one", routed("gpu")),
        ("# link: gpu keep  # stays warm", routed("gpu", keep=True)),
        ("# link: gpu files=off# tight", routed("gpu", files=False)),
        ("# link: gpu|local  ## fallback", routed("gpu", "local")),
        ("# link: files=off # default target", routed(files=False)),
    ],
)
def test_trailing_comment_after_the_options(line, expected):
    assert route_of(line) == expected


def test_routing_errors_are_link_errors_with_a_hint():
    err = refused("# link: gpu colour=red")
    assert isinstance(err, LinkError)
    assert err.hint.startswith("Write the first line as '# link: TARGET")


# -- %link commands -------------------------------------------------------------------

GOOD_COMMANDS = [
    ("%link", Command("help")),
    ("%link help", Command("help")),
    ("%link status", Command("status")),
    ("%link hosts", Command("hosts")),
    ("%link default gpu", Command("default", ("gpu",))),
    ("%link default gpu|local", Command("default", ("gpu|local",))),
    ("%link default local", Command("default", ("local",))),
    ("%link release", Command("release")),
    ("%link release gpu", Command("release", ("gpu",))),
    ("%link sync", Command("sync")),
    ("%link sync tesla", Command("sync", ("tesla",))),
    ("%link   status  ", Command("status")),
    ("%link\tstatus", Command("status")),
    ("%link \t release \t gpu", Command("release", ("gpu",))),
]


@pytest.mark.parametrize(("line", "expected"), GOOD_COMMANDS, ids=[c[0] for c in GOOD_COMMANDS])
def test_commands(line, expected):
    parsed = parse(line)
    assert parsed.commands == (expected,)
    assert parsed.code == ""
    assert not parsed.has_code
    assert parsed.route == Route()


@pytest.mark.parametrize(
    ("line", "usage"),
    [
        ("%link status now", "%link status"),
        ("%link hosts all", "%link hosts"),
        ("%link help me", "%link help"),
        ("%link default", "%link default TARGET"),
        ("%link default gpu tesla", "%link default TARGET"),
        ("%link release gpu tesla", "%link release [ALIAS]"),
        ("%link sync a b", "%link sync [ALIAS]"),
    ],
)
def test_wrong_argument_counts_show_the_usage(line, usage):
    err = refused(f"x = 1\n{line}\n")
    assert f"wrong arguments to '%link {line.split()[1]}'" in str(err)
    assert f"usage is '{usage}'" in str(err)


@pytest.mark.parametrize("name", ["stats", "start", "Status", "relase", "default=gpu", "list"])
def test_unknown_subcommand_lists_the_valid_ones(name):
    err = refused(f"%link {name}")
    assert f"unknown command '%link {name}'" in str(err)
    assert "valid: cache, default, help, hosts, pipeline, release, run, status, sync" in str(err)
    assert all(command in str(err) for command in COMMANDS)


@pytest.mark.parametrize(
    ("line", "fault"),
    [
        ("%link default gpu||local", "empty target"),
        ("%link default gpu|gpu", "'gpu' appears twice"),
        ("%link default g$u", "bad target name"),
        ("%link release gpu|tesla", "bad alias 'gpu|tesla'"),
        ("%link sync ../etc", "bad alias '../etc'"),
    ],
)
def test_command_arguments_are_checked_before_anything_runs(line, fault):
    # A bad second line means the first one must not run either: parse refuses the cell.
    err = refused(f"%link status\n{line}\n")
    assert fault in str(err)


def test_command_lines_are_blanked_and_every_other_line_kept_byte_for_byte():
    cell = "# link: gpu  \n%link status\n  x = 1\t\n\n%link release gpu\ny = 'é'  \n%link"
    parsed = parse(cell)
    assert parsed.code == "# link: gpu  \n\n  x = 1\t\n\n\ny = 'é'  \n"
    assert [(c.name, c.args, c.lineno) for c in parsed.commands] == [
        ("status", (), 2),
        ("release", ("gpu",), 5),
        ("help", (), 7),
    ]
    assert parsed.route == routed("gpu")
    assert parsed.has_code


def test_blanking_keeps_crlf_line_endings():
    cell = "%link status\r\nx = 1\r\n%link hosts\r\n"
    parsed = parse(cell)
    assert parsed.code == "\r\nx = 1\r\n\r\n"
    assert parsed.code.splitlines() == ["", "x = 1", ""]
    assert [c.name for c in parsed.commands] == ["status", "hosts"]


def test_blanking_keeps_the_line_numbers_of_the_code():
    cell = "%link default gpu\n%link status\nraise ValueError('line 3')\n"
    parsed = parse(cell)
    assert parsed.code.splitlines()[2] == "raise ValueError('line 3')"
    assert parsed.code.count("\n") == cell.count("\n")


@pytest.mark.parametrize(
    "cell",
    [
        "%link status",
        "%link status\n",
        "%link status\n%link hosts\n",
        "\n%link status\n\n",
        "%link default gpu\r\n%link release\r\n",
        "  \n%link sync\n\t\n",
    ],
    ids=repr,
)
def test_a_cell_of_only_commands_has_no_code(cell):
    parsed = parse(cell)
    assert parsed.commands
    assert not parsed.has_code
    assert parsed.code.count("\n") == cell.count("\n")


@pytest.mark.parametrize(
    "cell", ["%linkfoo", "%linkfoo status\n", "%link_status\n", "%%link status\n", "x %link\n"]
)
def test_look_alikes_are_not_commands(cell):
    parsed = parse(cell)
    assert parsed.commands == ()
    assert parsed.code == cell


def test_a_command_on_the_first_line_leaves_no_routing_comment():
    parsed = parse("%link status\n# link: gpu\nx = 1\n")
    assert parsed.route == Route()
    assert parsed.code == "\n# link: gpu\nx = 1\n"


def test_a_routing_comment_and_commands_together():
    parsed = parse("# link: gpu|local keep\n%link release gpu\nx = 1\n")
    assert parsed.route == routed("gpu", "local", keep=True)
    assert parsed.commands == (Command("release", ("gpu",), 2),)
    assert parsed.code == "# link: gpu|local keep\n\nx = 1\n"


# -- resolve() ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "targets",
    [(), ("local",), ("gpu",), ("gpu", "tesla"), ("tesla", "gpu", "local"), ("local", "gpu")],
)
def test_resolve_passes_known_targets_through(targets):
    assert resolve(targets, ["gpu", "tesla"]) == targets


def test_local_is_always_known():
    assert resolve(("local",), []) == ("local",)
    assert resolve(("local",), iter(())) == ("local",)


def test_unknown_target_message_is_exact():
    with pytest.raises(UnknownTargetError) as info:
        resolve(("gpux",), ["gpu", "tesla"])
    assert str(info.value) == "unknown host 'gpux'; known: gpu, tesla, local"
    assert info.value.target == "gpux"
    assert info.value.known == ["gpu", "tesla", "local"]
    assert isinstance(info.value, RoutingError)
    assert "link-kernel hosts add" in info.value.hint


@pytest.mark.parametrize(
    ("target", "known", "message"),
    [
        ("tesl", ["gpu", "tesla"], "unknown host 'tesl'; known: tesla, gpu, local"),
        ("gpu2", ["a100", "gpu", "tesla"], "unknown host 'gpu2'; known: gpu, a100, tesla, local"),
        ("gpu", ["zeta", "alpha"], "unknown host 'gpu'; known: alpha, zeta, local"),
        ("GPU", ["a100", "gpu"], "unknown host 'GPU'; known: gpu, a100, local"),
        (
            "gpu-3",
            ["gpu-1", "gpu-22", "cpu"],
            "unknown host 'gpu-3'; known: gpu-1, gpu-22, cpu, local",
        ),
        ("locl", ["gpu", "local"], "unknown host 'locl'; known: gpu, local"),
        ("x", [], "unknown host 'x'; known: local"),
        ("gpu", ["local", "gpu2", "local"], "unknown host 'gpu'; known: gpu2, local"),
    ],
)
def test_unknown_target_lists_closest_first_and_local_last(target, known, message):
    with pytest.raises(UnknownTargetError) as info:
        resolve((target,), known)
    assert str(info.value) == message
    assert info.value.known[-1] == LOCAL
    assert info.value.known.count(LOCAL) == 1


@pytest.mark.parametrize(
    ("chain", "bad"),
    [
        (("gpu", "tesla", "gpux"), "gpux"),
        (("local", "nope"), "nope"),
        (("gpu", "typo", "tesla"), "typo"),
        (("first", "gpu"), "first"),
    ],
)
def test_every_target_of_a_chain_is_checked(chain, bad):
    with pytest.raises(UnknownTargetError) as info:
        resolve(chain, ["gpu", "tesla"])
    assert info.value.target == bad


def test_parse_then_resolve_end_to_end():
    cell = parse("# link: gpu|tesla|local files=off\nx = 1\n")
    assert resolve(cell.route.targets, {"gpu": 1, "tesla": 2}) == ("gpu", "tesla", "local")
    with pytest.raises(UnknownTargetError) as info:
        resolve(parse("# link: gpux\n").route.targets, ("gpu", "tesla"))
    assert str(info.value) == "unknown host 'gpux'; known: gpu, tesla, local"


# -- properties -----------------------------------------------------------------------

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text rich in the grammar's own characters, so the fuzzing reaches the parser.
_ALPHABET = st.one_of(
    st.sampled_from(list("# link:%|=,.-_@+ \t\r\n\x0b\x0c\x85\u2028keepgufsontimeout0123456789")),
    st.sampled_from(["²", "٣", "\u212a", "é", "\x00", "\ufeff", "\xa0"]),
    st.characters(),
)
_WORDS = st.sampled_from(
    [
        "# link:",
        "#link:",
        "# link: ",
        "%link",
        "%link ",
        "gpu",
        "local",
        "|",
        " ",
        "\n",
        "\r\n",
        "keep",
        "kernel=",
        "in=",
        "out=",
        "files=",
        "timeout=",
        "gpus=",
        "cpus=",
        "mem=",
        "time=",
        "partition=",
        "on",
        "off",
        "nan",
        "inf",
        "-1",
        "0",
        ",",
        "#",
        "status",
        "default",
        "release",
        "sync",
        "help",
        "hosts",
        "²",
    ]
)
_RICH_TEXT = st.one_of(
    st.text(),
    st.text(_ALPHABET),
    st.lists(st.one_of(_WORDS, st.text(_ALPHABET, max_size=3))).map("".join),
)


@FAST
@given(_RICH_TEXT)
@example("# link: gpu cpus=²")
@example("# link: gpu mem=32\u212a")
@example("%link default ²")
@example("# link:\x85gpu")
@example("%link")
@example("x\r%link status")
def test_parse_raises_nothing_but_routing_error(text):
    try:
        parsed = parse(text)
    except RoutingError as err:
        assert str(err)
    else:
        assert isinstance(parsed, Cell)
        assert isinstance(parsed.code, str)


def _has_routing(text: str) -> bool:
    """An independent statement of 'has a routing comment or a %link line'."""
    lines = text.splitlines()
    if lines and re.match(r"[ \t]*#[ \t]*link[ \t]*:", lines[0]):
        return True
    return any(re.match(r"%link(\s|$)", line) for line in lines)


@FAST
@given(_RICH_TEXT)
def test_without_routing_the_code_is_unchanged_and_the_route_default(text):
    assume(not _has_routing(text))
    parsed = parse(text)
    assert parsed.code == text
    assert parsed.route == Route()
    assert parsed.commands == ()


_LINE_BREAKS = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits on
_PLAIN_LINE = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters=_LINE_BREAKS), max_size=20
).filter(lambda line: not re.match(r"%link(\s|$)", line))
_COMMAND_LINE = st.sampled_from(
    [
        "%link",
        "%link status",
        "%link hosts",
        "%link help",
        "%link default gpu",
        "%link release",
        "%link release gpu",
        "%link sync",
        "%link sync  tesla  ",
        "%link\tstatus",
    ]
)


@FAST
@given(
    st.lists(st.tuples(st.booleans(), _PLAIN_LINE, _COMMAND_LINE), max_size=12),
    st.sampled_from(["\n", "\r\n", "\r"]),
    st.booleans(),
)
def test_blanking_keeps_every_line_and_only_blanks_commands(rows, newline, trailing):
    lines = [command if is_command else plain for is_command, plain, command in rows]
    cell = newline.join(lines) + (newline if trailing and lines else "")
    assume(not (lines and re.match(r"[ \t]*#[ \t]*link[ \t]*:", lines[0])))
    parsed = parse(cell)
    expected = [("" if is_command else plain) for is_command, plain, _ in rows]
    assert parsed.code == newline.join(expected) + (newline if trailing and lines else "")
    assert line_count(parsed.code) == line_count(cell)
    assert parsed.code.count("\n") == cell.count("\n")
    assert [c.lineno for c in parsed.commands] == [
        i + 1 for i, (is_command, _, _) in enumerate(rows) if is_command
    ]


@FAST
@given(_RICH_TEXT)
@example("%link")
@example("x = 1\r\n%link status\r\n%link")
@example("# link: gpu\x0c%link hosts\u2028y")
def test_blanking_preserves_the_number_of_lines_of_any_cell(text):
    try:
        parsed = parse(text)
    except RoutingError:
        return
    assert line_count(parsed.code) == line_count(text)
    for before, after in zip(lines_of(text), lines_of(parsed.code), strict=True):
        assert after in (before, "")


_TARGET = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,8}", fullmatch=True)


@FAST
@given(
    st.lists(_TARGET, min_size=1, max_size=5, unique=True),
    st.booleans(),
    st.sampled_from([" ", "\t", "  "]),
)
def test_any_well_formed_chain_round_trips(targets, keep, gap):
    assume(targets[0] != "keep")
    line = "# link:" + gap + "|".join(targets) + (gap + "keep" if keep else "")
    route = route_of(line)
    assert route.targets == tuple(targets)
    assert route.keep is keep
    assert resolve(route.targets, targets) == tuple(targets)


@pytest.mark.parametrize(
    ("line", "args"),
    [
        ("%link cache", ()),
        ("%link cache clear", ("clear",)),
        ("%link cache clear train", ("clear", "train")),
        ("%link pipeline", ()),
        ("%link run", ()),
        ("%link run train", ("train",)),
    ],
)
def test_pipeline_commands(line, args):
    (command,) = parse(line).commands
    assert command.args == args


@pytest.mark.parametrize("line", ["%link cache drop", "%link cache clear 1x", "%link run a-b", "%link pipeline x"])
def test_malformed_pipeline_commands_are_refused(line):
    refused(line)
