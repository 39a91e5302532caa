"""routing_fields: the model and stream members of a request body, scanned when it is large."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llmnode.errors import BadRequest
from llmnode.web.routing import full_routing, quick_routing, routing_fields, SCAN_ABOVE, with_model

NAMES = ("model", "stream")

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12) | \
    st.sampled_from(['"', "\\", '\\"', "\\\\", '{"model": "x"}', "]}", "\u00fc\u4e2d", "model"])
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(NAMES) | text, inner, max_size=4),
    max_leaves=12)
members = st.dictionaries(st.sampled_from(NAMES) | text, values, max_size=6)


def padded(document: dict, key: str = "padding") -> dict:
    """C{document} with a member long enough to make it a scanned body."""
    return dict(document, **{key: "x" * (SCAN_ABOVE + 1)})


class RoutingFieldsTests(SynchronousTestCase):

    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(members, st.booleans(), st.sampled_from([None, 1]), st.booleans())
    def test_scan_agrees_with_parsing(self, document, ascii_only, indent, pad_first):
        document = padded(document)
        if pad_first:
            document = dict(reversed(list(document.items())))
        body = json.dumps(document, ensure_ascii=ascii_only, indent=indent).encode("utf-8")
        expected = {name: document[name] for name in NAMES if name in document}
        self.assertEqual(routing_fields(body), expected)

    def test_small_and_large_bodies_alike(self):
        for document in ({"model": "m", "stream": True}, padded({"model": "m", "stream": True})):
            self.assertEqual(routing_fields(json.dumps(document).encode()),
                             {"model": "m", "stream": True})

    def test_nested_and_quoted_lookalikes_are_not_members(self):
        document = padded({"messages": [{"model": "inner", "content": '"model": "fake"'}],
                           "x": {"stream": True}, "model": "outer"})
        self.assertEqual(routing_fields(json.dumps(document).encode()), {"model": "outer"})

    def test_escaped_key_and_last_duplicate(self):
        body = b'{"mod\\u0065l": "a", "messages": ["' + b"y" * SCAN_ABOVE + b'"], "model": "b"}'
        self.assertEqual(routing_fields(body), {"model": "b"})

    def test_many_escaped_quotes_still_right(self):
        document = padded({"model": "m"}, key='a"b')
        document["messages"] = ['say \\"hi\\" ' * 5000]
        self.assertEqual(routing_fields(json.dumps(document).encode()), {"model": "m"})

    def test_non_string_model_is_returned_as_is(self):
        for model in ({"id": "m"}, ["m"], 3, None):
            body = json.dumps(padded({"model": model})).encode()
            self.assertEqual(routing_fields(body), {"model": model})

    def test_large_bodies_that_are_not_objects_are_refused(self):
        filler = "x" * (SCAN_ABOVE + 1)
        for body in (json.dumps([filler]).encode(),
                     json.dumps({"model": "m", "p": filler}).encode()[:-3],
                     json.dumps({"model": "m", "p": filler}).encode() + b" {}",
                     b"\xff\xfe" + json.dumps({"p": filler}).encode()):
            self.assertRaises(BadRequest, routing_fields, body)


def many_small_objects(count: int) -> list:
    return [{"role": "user", "content": "hi"}] * count


class QuickRoutingTests(SynchronousTestCase):
    """quick_routing: what the proxy reads on the reactor, without scanning a large body's
    nested members; None sends the body to full_routing in a worker thread."""

    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(members, st.booleans(), st.sampled_from([None, 1]), st.booleans())
    def test_whatever_it_answers_agrees_with_parsing(self, document, ascii_only, indent,
                                                    pad_first):
        document = padded(document)
        if pad_first:
            document = dict(reversed(list(document.items())))
        body = json.dumps(document, ensure_ascii=ascii_only, indent=indent).encode("utf-8")
        expected = {name: document[name] for name in NAMES if name in document}
        quick = quick_routing(body)
        if quick is not None:
            self.assertEqual(quick.members, expected)
        self.assertEqual(full_routing(body).members, expected)

    def test_the_usual_large_body_needs_no_full_scan(self):
        messages = many_small_objects(SCAN_ABOVE // 10)
        for document, expected in (
                ({"model": "m", "messages": messages, "stream": True},
                 {"model": "m", "stream": True}),
                ({"model": "m", "messages": messages}, {"model": "m"}),
                ({"messages": messages, "tools": [{}], "model": "m", "stream": False},
                 {"model": "m", "stream": False}),
                ({"stream": True, "messages": messages, "temperature": 0.5, "model": "m"},
                 {"model": "m", "stream": True})):
            body = json.dumps(document, indent=1).encode()
            self.assertEqual(quick_routing(body).members, expected, list(document))

    def test_a_name_in_the_middle_sends_it_to_the_full_scan(self):
        messages = many_small_objects(SCAN_ABOVE // 10)
        for document in ({"model": "m", "messages": messages, "stream": True, "tools": [1]},
                         {"messages": messages, "model": "m", "tools": messages},
                         {"model": "m", "messages": messages + [{"model": "inner"}]}):
            body = json.dumps(document).encode()
            self.assertIsNone(quick_routing(body), list(document))
            expected = {name: document[name] for name in NAMES if name in document}
            self.assertEqual(full_routing(body).members, expected)

    def test_a_missing_model_is_known_without_a_full_scan(self):
        body = json.dumps({"messages": many_small_objects(SCAN_ABOVE // 10)}).encode()
        self.assertEqual(quick_routing(body).members, {})

    def test_a_duplicate_model_after_the_large_member_wins_as_when_parsed(self):
        body = json.dumps({"model": "first", "messages": many_small_objects(SCAN_ABOVE // 10)}
                          ).encode()[:-1] + b', "model": "last"}'
        self.assertEqual(quick_routing(body).members, {"model": "last"})
        self.assertEqual(json.loads(body)["model"], "last")

    @settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
    @given(members, st.booleans(), st.text(max_size=8))
    def test_with_model_changes_only_the_model(self, document, pad_first, name):
        document = dict(padded(document), model="original")
        if pad_first:
            document = dict(reversed(list(document.items())))
        body = json.dumps(document).encode()
        routing = quick_routing(body) or full_routing(body)
        self.assertEqual(json.loads(with_model(body, routing, name)), dict(document, model=name))
