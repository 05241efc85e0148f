"""Renders campaign content per recipient in a sandboxed Jinja2 environment.

Fetched attributes are top-level variables (`{{ first_name }}`); the campaign's
own recipient attributes sit under `recipient` (`{{ recipient.tier }}`); named
content APIs' fields under `content` (`{{ content.offers.headline }}`). HTML
is autoescaped; a missing variable or a line break in a header value fails that
recipient, never the batch. Error texts name variables and fields, not values.

A template made only of text and `{{ ... }}` outputs (no `{% %}` tags: `Hello {{ first_name }}`,
`{{ name | default('there') }}`) is rendered piece by piece: a plain variable read that finds a
string is filled in without Jinja, any other output by its expression alone, compiled once; the
output is what Jinja's render of the whole template gives. For email content made only of such
templates the renderer also gives a `SubstitutionPattern`: the content once, with a tag where each
output goes, and per recipient the tags' values, so a provider that substitutes (SendGrid's
`substitutions`) takes one request for many personalised messages.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from jinja2 import Template, TemplateError, TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.sandbox import SecurityError
from markupsafe import escape
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.errors import InvalidArgument
from libs.limits import FIELD_LIMITS
from libs.scrub import scrub_text
from services.dispatcher.template_sandbox import LimitExceeded, OutOfTime, OutputNotAValue, Sandbox, one_budget
from services.dispatcher.template_sandbox import render as bounded_render

MAX_TEMPLATE_LENGTH = 256 * 1024
# Compiling takes about 0.1-0.2 ms a node (nested expressions the most): this bounds it to seconds.
MAX_TEMPLATE_NODES = 20_000
TOO_DEEP = "nests expressions or tags too deeply"
MAX_TEMPLATE_DEPTH = 80  # tags in tags and expressions in expressions; Python's compiler gives up near 200
MAX_CONTENT_APIS = 10
_API_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
# Substitution tags are "[ts:<n>]". A pattern is only made when its templates' own text holds no
# "[ts:", and used for a recipient only when no value does: every "[ts:" in a pattern is a tag.
TAG_OPEN = "[ts:"
# What ends a line in a header: CR and LF, and what else the email package reads as a line's end
# (`str.splitlines`: a Word manual line break, a form feed, NEL, U+2028 and U+2029), which it refuses
# to write into one.
_LINE_BREAK = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
# A rendered subject is held to its template's limit: recipients' values can make a 50,000-character
# subject of a short template, which no mailbox shows and providers refuse or cut as they each see fit.
MAX_SUBJECT_LENGTH = FIELD_LIMITS["tokensend.dispatcher.v1.Content.subject"].length
UNDEFINED_COMPUTED = (
    "something the template reads is undefined (not named: the template looks up keys made from the recipient's values)"
)

_Path = tuple[str, ...]  # a variable and the keys read from it: ("recipient", "tier")


def _shape(template: nodes.Template) -> tuple[int, int]:
    """How many nodes a parsed template has, and how deep they nest."""
    count, deepest = 0, 0
    stack: list[tuple[nodes.Node, int]] = [(template, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node.iter_child_nodes())
    return count, deepest


def content_api_names(template: nodes.Template, field: str) -> set[str]:
    """Content APIs a template reads: `content.<name>`, `content['<name>']` and `content.get('<name>')`.
    Any other read through a method of the dict (`content.items()`) names none, as Jinja finds the method
    before any key of that name: refused as INVALID_ARGUMENT naming `field`."""
    called = {id(call.node): call for call in template.find_all(nodes.Call)}
    names: set[str] = set()
    for node in template.find_all((nodes.Getattr, nodes.Getitem)):
        target = node.node
        if not (isinstance(target, nodes.Name) and target.name == "content"):
            continue
        if isinstance(node, nodes.Getattr):
            if not hasattr(dict, node.attr):
                names.add(node.attr)
                continue
            call = called.get(id(node))
            first = call.args[0] if call is not None and call.args else None
            if node.attr != "get" or not (isinstance(first, nodes.Const) and isinstance(first.value, str)):
                raise InvalidArgument(
                    field,
                    f"reads content.{node.attr}, which names no content API: read each as content.<name>, "
                    "content['<name>'] or content.get('<name>')",
                )
            names.add(first.value)
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            names.add(node.arg.value)
    return names


class RenderFailed(Exception):
    """A recipient's content could not be rendered; `reason` is safe to show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _RanOutOfTime(RenderFailed):
    """A render that took longer than the sandbox allows (MAX_RENDER_SECONDS)."""


_OUT_OF_TIME = object()  # a batch's memo key: the reason its renders stopped


@dataclass(frozen=True, eq=False)
class SubstitutionPattern:
    """Email content with tags where the recipients' values go; one per compiled content.

    `tags` names, for each tag, the output whose rendered value goes there (an output of the HTML
    part is escaped, one of the subject or text is not, so the same expression has a tag of each).
    """

    subject: str
    html_body: str
    text_body: str
    tags: tuple[tuple[str, str], ...]  # (tag, the output's key)


@dataclass
class RenderedContent:
    subject: str = ""
    html_body: str = ""
    text_body: str = ""
    sms_body: str = ""
    whatsapp_params: list[str] = field(default_factory=list)
    # This recipient's value for each tag of `pattern`; None when there is no pattern, or a value
    # would not fit in one (it holds "[ts:"). Holds fetched values, as the rendered texts do.
    pattern: SubstitutionPattern | None = None
    substitutions: dict[str, str] | None = None


def _random(template: nodes.Template) -> bool:
    """Whether a template can render differently for the same variables (`random`, `lipsum`)."""
    if any(f.name == "random" for f in template.find_all(nodes.Filter)):
        return True
    return any(n.name == "lipsum" for n in template.find_all(nodes.Name))


def _key(node: nodes.Getattr | nodes.Getitem) -> str | None:
    """The key `x.key` or `x['key']` reads from a dict; None for `x.items` (the dict's method, not a
    key) and a computed or numeric index."""
    if isinstance(node, nodes.Getattr):
        return None if hasattr(dict, node.attr) else node.attr
    if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
        return node.arg.value
    return None


# Filters that look up an attribute or item named by their arguments (`attr(name)`, `map(attribute=...)`).
_LOOKUP_FILTERS = frozenset(
    {"attr", "dictsort", "groupby", "join", "map", "max", "min", "rejectattr", "selectattr", "sort", "sum", "unique"}
)


def _computes_keys(template: nodes.Template) -> bool:
    """Whether a missing attribute or item can have a name the template does not write: `x[first_name]`,
    `x[city | lower]`, `x | attr(code)`. Jinja's message names what was missing, which would then be
    (derived from) a fetched value; every other name in it is the template's own text."""
    for node in template.find_all(nodes.Getitem):
        if not isinstance(node.arg, nodes.Const):
            return True
    for node in template.find_all(nodes.Filter):
        if node.name in _LOOKUP_FILTERS:
            arguments = [*node.args, *(k.value for k in node.kwargs)]
            if node.dyn_args is not None or node.dyn_kwargs is not None:
                return True
            if any(not isinstance(a, nodes.Const) for a in arguments):
                return True
    return False


def _keys_read(template: nodes.Template, name: str) -> set[str] | None:
    """The keys a template reads from the dict variable `name` (`name.key`, `name['key']`), or None
    when it uses the dict any other way (a loop, a filter, a method, a computed key): all of it counts."""
    keys: set[str] = set()
    reads = 0
    for node in template.find_all((nodes.Getattr, nodes.Getitem)):
        target = node.node
        if not (isinstance(target, nodes.Name) and target.name == name):
            continue
        key = _key(node)
        if key is None:
            return None
        keys.add(key)
        reads += 1
    uses = sum(1 for n in template.find_all(nodes.Name) if n.name == name)
    return keys if uses == reads else None


def _hashable(value: Any) -> Any:
    """A memo key part. Items keep their order: equal keys still mean equal values, and two equal
    dicts built in another order only cost a second render."""
    if isinstance(value, dict):
        return tuple((k, _hashable(v) if isinstance(v, dict) else v) for k, v in value.items())
    return value


def _values(context: dict[str, Any]) -> set[str]:
    """Every string in a render context (fetched values, recipient and content fields)."""
    found: set[str] = set()
    stack: list[Any] = [context]
    seen: set[int] = set()  # a context is plain dicts of strings; never walk one twice all the same
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if id(value) in seen:
                continue
            seen.add(id(value))
            stack.extend(value.values())
        elif isinstance(value, str) and len(value) >= 2:
            found.add(value)
    return found


def _path(node: nodes.Node) -> _Path | None:
    """`name`, `name.key` or `name['key']` (any depth) as a path; None for any other expression."""
    keys: list[str] = []
    while isinstance(node, nodes.Getattr | nodes.Getitem):
        key = _key(node)
        if key is None:
            return None
        keys.append(key)
        node = node.node
    if not isinstance(node, nodes.Name):
        return None
    return (node.name, *reversed(keys))


class _Output:
    """One `{{ ... }}` of a template: a variable read filled in without Jinja when it finds a string,
    anything else rendered by its expression alone: compiled with the content, or for a variable
    read, the first time it finds something other than a string."""

    __slots__ = ("key", "path", "_node", "_env", "_jinja", "_escape")

    def __init__(self, node: nodes.Expr, env: Sandbox) -> None:
        self._escape = bool(env.autoescape)
        self.key = f"{'html' if self._escape else 'text'}:{node!r}"  # equal expressions, equal keys
        self.path = _path(node)
        self._node = node
        self._env = env
        self._jinja: Template | None = None
        if self.path is None:  # compiled with the content (in a thread), not by a render on the event loop
            self._compile()

    def _compile(self) -> Template:
        alone = nodes.Template([nodes.Output([self._node], lineno=self._node.lineno)], lineno=1)
        alone.set_environment(self._env)
        self._jinja = self._env.from_string(alone)
        return self._jinja

    def render(self, context: dict[str, Any]) -> str:
        if self.path is not None:
            value = _lookup(context, self.path)
            if value is not None:
                return str(escape(value)) if self._escape else value
        return bounded_render(self._jinja or self._compile(), context)


def _pieces(template: nodes.Template, env: Sandbox) -> tuple[str | _Output, ...] | None:
    """A template's text and outputs, when it is made of nothing else (no `{% %}` tags); else None."""
    pieces: list[str | _Output] = []
    for statement in template.body:
        if not isinstance(statement, nodes.Output):
            return None
        for node in statement.nodes:
            pieces.append(node.data if isinstance(node, nodes.TemplateData) else _Output(node, env))
    return tuple(pieces)


_ABSENT = object()


def _lookup(context: dict[str, Any], path: _Path) -> str | None:
    """The string a read of `path` finds as plainly as Jinja would: a context variable, then keys of
    plain dicts. None otherwise (absent, another type): Jinja decides, and raises its own error for
    what is missing."""
    value = context.get(path[0], _ABSENT)
    for key in path[1:]:
        if type(value) is not dict:
            return None
        value = value.get(key, _ABSENT)
    return value if type(value) is str else None


# The root of a path read from a name the template binds itself: no context holds it.
_BOUND = ""


def _paths_read(template: nodes.Template) -> tuple[_Path, ...]:
    """Every key path the template writes out (`content.offers.code`, `recipient['tier']`); one read from
    a name the template binds (`set`, `for`, `with`, a macro's parameter) with `_BOUND` as its root."""
    bound = {node.name for node in template.find_all(nodes.Name) if node.ctx in ("store", "param")}
    found = {_path(node) for node in template.find_all((nodes.Getattr, nodes.Getitem))}
    return tuple(sorted((_BOUND, *path[1:]) if path[0] in bound else path for path in found if path is not None))


def _missing_path(message: str, paths: tuple[_Path, ...], context: dict[str, Any]) -> _Path | None:
    """The one path of `paths` whose last key is the one Jinja's `message` says a dict lacks, and which
    this context's dicts lack; None when none or several could be it (the same key read elsewhere, or
    from a name the template binds, whose dict is not known here)."""
    found = set()
    for path in paths:
        if not message.endswith(f" has no attribute {path[-1]!r}"):
            continue
        if path[0] == _BOUND:
            return None
        value = context.get(path[0], _ABSENT)
        for key in path[1:-1]:
            value = value.get(key, _ABSENT) if type(value) is dict else _ABSENT
        if type(value) is dict and path[-1] not in value:
            found.add(path)
    return found.pop() if len(found) == 1 else None


class _Template:
    """A compiled template, rendered piece by piece when it is only text and outputs."""

    __slots__ = ("jinja", "pieces", "computes_keys", "reads_only", "paths")

    def __init__(
        self,
        jinja: Template,
        pieces: tuple[str | _Output, ...] | None,
        computes_keys: bool = False,
        paths: tuple[_Path, ...] = (),
    ) -> None:
        self.jinja = jinja
        self.pieces = pieces
        self.computes_keys = computes_keys  # its undefined-lookup messages may name a fetched value
        self.paths = paths  # the key paths it writes: a failed one is named by its whole path
        self.reads_only = pieces is not None and all(type(p) is str or p.path is not None for p in pieces)

    def render(self, context: dict[str, Any], values: dict[str, str] | None = None) -> str:
        """`values`, shared by a message's parts, keeps each output's value by its key: an expression
        is rendered once for the whole message, so its parts and its substitutions agree. Without
        `values` a template of other expressions than reads is rendered whole: one Jinja render
        costs less than one per expression."""
        pieces = self.pieces
        if pieces is None or (values is None and not self.reads_only):
            return bounded_render(self.jinja, context)
        out = []
        for piece in pieces:
            if type(piece) is str:
                out.append(piece)
            elif values is None:
                out.append(piece.render(context))
            else:
                value = values.get(piece.key)
                if value is None:
                    value = values[piece.key] = piece.render(context)
                out.append(value)
        return "".join(out)


def _pattern(subject: _Template | None, html: _Template | None, text: _Template | None) -> SubstitutionPattern | None:
    """The email content with a tag for each output, when every part is only text and outputs and
    no text of its own looks like a tag."""
    parts = (subject, html, text)
    if not (html or text) or any(p is not None and p.pieces is None for p in parts):
        return None
    tags: dict[str, str] = {}  # output key -> tag
    spelled: list[str] = []
    for part in parts:
        out = []
        for piece in () if part is None else part.pieces or ():
            if type(piece) is str:
                if TAG_OPEN in piece:
                    return None
                out.append(piece)
            else:
                tag = tags.get(piece.key)
                if tag is None:
                    tag = tags[piece.key] = f"{TAG_OPEN}{len(tags)}]"
                out.append(tag)
        spelled.append("".join(out))
    return SubstitutionPattern(spelled[0], spelled[1], spelled[2], tuple((tag, key) for key, tag in tags.items()))


class ContentTemplates:
    """A campaign's content compiled once per call, rendered once per recipient."""

    _plain = Sandbox(autoescape=False)
    _html = Sandbox(autoescape=True)

    def __init__(self, content: pb.Content) -> None:
        apis: set[str] = set()
        variables: set[str] = set()
        recipient_keys: set[str] | None = set()
        deterministic = True

        def compile_(env: Sandbox, source: str, name: str):
            nonlocal deterministic, recipient_keys
            if not source:
                return None
            if len(source) > MAX_TEMPLATE_LENGTH:
                raise InvalidArgument(name, f"must be at most {MAX_TEMPLATE_LENGTH} characters")
            try:
                parsed = env.parse(source)
                count, depth = _shape(parsed)
                if count > MAX_TEMPLATE_NODES:
                    raise InvalidArgument(
                        name, f"has more than {MAX_TEMPLATE_NODES:,} expressions, tags and pieces of text"
                    )
                if depth > MAX_TEMPLATE_DEPTH:
                    raise InvalidArgument(name, TOO_DEEP)
                for api in sorted(content_api_names(parsed, name)):
                    if not _API_NAME.match(api):
                        raise InvalidArgument(name, f"content API name {api!r} is not an identifier")
                    apis.add(api)
                variables.update(meta.find_undeclared_variables(parsed))
                deterministic = deterministic and not _random(parsed)
                read = _keys_read(parsed, "recipient")
                recipient_keys = None if read is None or recipient_keys is None else recipient_keys | read
                if name == "content.subject" and any(
                    _LINE_BREAK.search(t.data) for t in parsed.find_all(nodes.TemplateData)
                ):
                    # Its own text ("\r\n" is read as "\n") would fail every recipient's render, after each
                    # one's contact was fetched.
                    raise InvalidArgument(name, "must not contain line breaks: a subject is one line")
                computes_keys = _computes_keys(parsed)
                paths = _paths_read(parsed)  # before the guard rewrites the tree
                env.guard(parsed)
                return _Template(env.from_string(parsed), _pieces(parsed, env), computes_keys, paths)
            except TemplateSyntaxError as exc:
                raise InvalidArgument(name, f"template syntax error on line {exc.lineno}: {exc.message}") from None
            except RecursionError:
                raise InvalidArgument(name, TOO_DEEP) from None
            except (ValueError, OverflowError, SyntaxError, MemoryError) as exc:  # a number too long, say
                raise InvalidArgument(name, f"does not compile ({type(exc).__name__})") from None

        self._subject = compile_(self._plain, content.subject, "content.subject")
        self._html_body = compile_(self._html, content.html_body, "content.html_body")
        self._text_body = compile_(self._plain, content.text_body, "content.text_body")
        self._sms_body = compile_(self._plain, content.sms_body, "content.sms_body")
        self._params = [
            compile_(self._plain, p, f"content.whatsapp_template.params[{i}]")
            for i, p in enumerate(content.whatsapp_template.params)
        ]
        if len(apis) > MAX_CONTENT_APIS:
            raise InvalidArgument("content", f"templates may use at most {MAX_CONTENT_APIS} content APIs")
        # The content APIs to call for every recipient, found in the templates themselves.
        self.content_apis: tuple[str, ...] = tuple(sorted(apis))
        # Recipients whose variables have the same values get the same message: rendered once per batch.
        # Of the recipient's own attributes only those the templates read count, when that is known.
        self._variables = sorted(variables) if deterministic else None
        self._recipient_keys = tuple(sorted(recipient_keys)) if recipient_keys is not None else None
        # A pattern keeps one value per expression: two `{{ lipsum() }}` would say the same thing.
        self.pattern = _pattern(self._subject, self._html_body, self._text_body) if deterministic else None
        parts = (self._subject, self._html_body, self._text_body, self._sms_body, *self._params)
        self._reads_only = all(part is None or part.reads_only for part in parts)

    def render(
        self,
        fetched: dict[str, str],
        recipient: dict[str, str],
        content: dict[str, dict[str, str]] | None = None,
        memo: dict[Any, Any] | None = None,
    ) -> RenderedContent:
        """`memo` (one per batch, dropped with it: it holds fetched values) skips rendering what was rendered.
        Once a render of the batch has run out of time, the others fail at once: a template that
        loops too long would otherwise hold the event loop MAX_RENDER_SECONDS per recipient.

        The context holds the caller's dicts as they are: templates are sandboxed and cannot change them."""
        if memo is not None and _OUT_OF_TIME in memo:
            raise RenderFailed(memo[_OUT_OF_TIME])
        content = content or {}
        try:
            if memo is None or self._variables is None:
                return self._render({**fetched, "recipient": recipient, "content": content})
            # The key read straight from the caller's dicts: the context is made only for a render,
            # which most recipients of a campaign do not need (once per distinct key).
            key = tuple([self._memo_part(name, fetched, recipient, content) for name in self._variables])
            rendered = memo.get(key)
            if rendered is None:
                rendered = memo[key] = self._render({**fetched, "recipient": recipient, "content": content})
            return rendered
        except _RanOutOfTime as exc:
            if memo is not None:
                memo[_OUT_OF_TIME] = f"{exc.reason} for another recipient of this batch: not rendered"
            raise

    def _memo_part(self, name: str, fetched: dict[str, str], recipient: dict[str, str], content: dict) -> Any:
        """The value the context would give `name` (`recipient` and `content` over a fetched value of
        that name), as a key."""
        if name == "recipient":
            if self._recipient_keys is not None:
                return tuple([recipient.get(key) for key in self._recipient_keys])  # None: absent (values are text)
            return _hashable(recipient)
        return _hashable(content if name == "content" else fetched.get(name))

    def _render(self, context: dict[str, Any]) -> RenderedContent:
        if self._reads_only:  # filled in without Jinja (a read that finds no string renders on its own)
            return self._render_parts(context)
        with one_budget():  # every part and output of the message, one budget
            return self._render_parts(context)

    def _render_parts(self, context: dict[str, Any]) -> RenderedContent:
        pattern = self.pattern
        # The outputs' values by key, when there is a pattern to fill with them.
        values: dict[str, str] | None = {} if pattern is not None else None

        def run(template: _Template | None, name: str) -> str:
            if template is None:
                return ""
            try:
                text = template.render(context, values)
                if not text.isascii():
                    text.encode()  # a lone surrogate (`'\ud800'`) would fail the message later, unnamed
                return text
            except UnicodeEncodeError:
                raise RenderFailed(f"{name}: the text holds a character that is not valid Unicode") from None
            except UndefinedError as exc:
                if template.computes_keys:
                    # The missing name may be a fetched value, or made from one (`city | lower`), which
                    # no scrubbing of the exact values would catch.
                    raise RenderFailed(f"{name}: {UNDEFINED_COMPUTED}") from None
                # Every name in the message is the template's own text; the fetched values are
                # scrubbed all the same. A key a dict lacks is named by its path: which API's reply lacked it.
                message = exc.message or ""
                missing = _missing_path(message, template.paths, context)
                if missing is not None:
                    message = f"{'.'.join(missing)!r} is undefined"
                raise RenderFailed(f"{name}: {scrub_text(message, extra=_values(context))}") from None
            except OutOfTime as exc:
                raise _RanOutOfTime(f"{name}: {exc.message}") from None
            except (LimitExceeded, OutputNotAValue) as exc:
                raise RenderFailed(f"{name}: {exc.message}") from None
            except SecurityError:
                raise RenderFailed(f"{name}: the template tried something the sandbox forbids") from None
            except TemplateError as exc:
                raise RenderFailed(f"{name}: {type(exc).__name__}") from None
            except Exception as exc:  # filters on fetched values can fail in many ways; name the kind only
                raise RenderFailed(f"{name}: {type(exc).__name__} while rendering") from None

        rendered = RenderedContent(
            subject=run(self._subject, "content.subject"),
            html_body=run(self._html_body, "content.html_body"),
            text_body=run(self._text_body, "content.text_body"),
            sms_body=run(self._sms_body, "content.sms_body"),
            whatsapp_params=[run(t, f"content.whatsapp_template.params[{i}]") for i, t in enumerate(self._params)],
        )
        subject = rendered.subject
        if not subject.isprintable() and _LINE_BREAK.search(subject):  # each line break is unprintable
            raise RenderFailed("content.subject: a rendered subject must not contain line breaks")
        if len(subject) > MAX_SUBJECT_LENGTH:
            raise RenderFailed(
                f"content.subject: a rendered subject is at most {MAX_SUBJECT_LENGTH:,} characters, as its template "
                f"is; this one is {len(subject):,} (the recipient's values made it so)"
            )
        if values is not None and not any(TAG_OPEN in value for value in values.values()):
            # Every output of the subject, text and HTML was rendered above, once, into `values`.
            rendered.pattern = pattern
            rendered.substitutions = {tag: values[key] for tag, key in pattern.tags}
        return rendered


class CompiledContents:
    """`ContentTemplates` by content, the most recently used kept.

    A campaign engine that calls Dispatch with a few recipients at a time sends the same content
    call after call, and compiling it was a fifth of such a call's CPU. Compiled templates are
    shared between calls: they hold no state of a render. The key is the content itself (campaign
    templates, never a fetched value), so an edited content is compiled afresh. Bounded by entries
    and by the size of the contents they were compiled from; content that does not compile is not
    kept, so its error is raised every time.
    """

    def __init__(self, max_entries: int = 256, max_bytes: int = 16 * 1024 * 1024) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._by_content: OrderedDict[bytes, ContentTemplates] = OrderedDict()

    async def load(self, content: pb.Content) -> ContentTemplates:
        """The content's compiled templates, compiled in a thread when not kept: a big template takes
        seconds to compile, which would otherwise hold the event loop and every batch on it."""
        key = content.SerializeToString(deterministic=True)
        templates = self._kept(key)
        if templates is None:
            templates = self._keep(key, await asyncio.to_thread(ContentTemplates, content))
        return templates

    def _kept(self, key: bytes) -> ContentTemplates | None:
        templates = self._by_content.get(key)
        if templates is not None:
            self._by_content.move_to_end(key)
        return templates

    def _keep(self, key: bytes, templates: ContentTemplates) -> ContentTemplates:
        kept = self._kept(key)  # compiled meanwhile by a call beside this one
        if kept is not None:
            return kept
        if len(key) <= self._max_bytes:
            self._by_content[key] = templates
            self._bytes += len(key)
            while len(self._by_content) > self._max_entries or self._bytes > self._max_bytes:
                evicted, _ = self._by_content.popitem(last=False)
                self._bytes -= len(evicted)
        return templates

    def __len__(self) -> int:
        return len(self._by_content)
