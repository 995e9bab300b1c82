"""target.path_problem: the paths nginx refuses (400), exactly; the query is never decoded."""

import pytest

from fileproxy.http.target import path_problem

BAD_ENCODING = "malformed percent-encoding in the request path"
NUL = "encoded NUL (%00) in the request path"
ABOVE_ROOT = "the request path climbs above the root (..)"


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("/files/4k.bin", None),
        ("/", None),
        ("/%zz", BAD_ENCODING),
        ("/a%2", BAD_ENCODING),
        ("/a%", BAD_ENCODING),
        ("/%00", NUL),
        ("/%C3%A9/%2F", None),
        ("/?q=%zz&r=../../..", None),
        ("/a#%zz", None),
        ("/../x", ABOVE_ROOT),
        ("/a/../b", None),
        ("/a//../..", ABOVE_ROOT),  # empty segments merged, as nginx's merge_slashes
        ("/a%2f..%2f..%2fx", ABOVE_ROOT),  # %2f decodes to / for this check
        ("/.%2E/x", ABOVE_ROOT),
        ("http://proxy.example:80/%zz", BAD_ENCODING),  # absolute-form: its path
        ("http://proxy.example:80", None),
        ("*", None),
    ],
)
def test_path_problem(target, problem):
    assert path_problem(target) == problem
