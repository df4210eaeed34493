"""The design document and the citations of it (docs/DESIGN.md).

Code and documents cite the design document as ``docs/DESIGN.md §N`` or ``docs/DESIGN.md §N, Eq. K``. These tests
check, over the files git tracks:

1. every such citation in a ``.py`` or ``.md`` file names a section that exists, every equation cited with it is
   defined, inside one of the cited sections, and a quoted paragraph title (``§5, "What the logs show"``) occurs in
   that section; the document's own equation numbering is 1..K, each number defined once, and its index table
   agrees with where each equation is defined;
2. no tracked file points at a design document other than docs/DESIGN.md (a bare file name without ``docs/``, or
   the bare word followed by a section sign) or at the shared briefing folder that users do not have.
"""
import os.path as osp
import re
import subprocess
from typing import Dict, List, Tuple

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DOC = 'docs/DESIGN.md'

# a citation: the path, then one or more "§N", "Eq. K" or "Eq. K–L" tokens separated by blanks, commas,
# semicolons, "and" or a comment sign (a citation may continue on the next comment line); "§N" may carry a
# quoted paragraph title
_TOKEN = r'(?:§\s?\d+(?:,\s*"[^"\n]+")?|Eq\.\s*\d+(?:\s*[–-]\s*\d+)?)'
CITATION = re.compile(r'docs/DESIGN\.md`?(?P<tail>(?:(?:\s|#|,|;|\band\b)*' + _TOKEN + r')+)')
TOKEN = re.compile(r'§\s?(?P<section>\d+)(?:,\s*"(?P<title>[^"\n]+)")?'
                   r'|Eq\.\s*(?P<eq>\d+)(?:\s*[–-]\s*(?P<eq_last>\d+))?')
HEADING = re.compile(r'^## §(\d+) ', re.M)
EQUATION_TAG = re.compile(r'\(Eq\. (\d+)\)\s*$')          # an equation is defined at the end of a code line
INDEX_ROW = re.compile(r'^\| §(\d+) [^|]*\| (.*) \|\s*$', re.M)

# what must not appear (built so that this file does not contain them itself)
SHARED_FOLDER = '/work/' + 'shared'
OTHER_DESIGN_FILE = re.compile(r'(?<!docs/)\bDESIGN\.md')     # the file name without the docs/ folder
BARE_DESIGN_SECTION = re.compile(r'\bDESIGN\s+§')             # the bare word, then a section sign


def tracked_files() -> List[str]:
    try:
        out = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f'not a git checkout ({exc}): the citation checks run on the files git tracks')
    return sorted(name for name in out.decode('utf-8').split('\0') if name)


def read_text(name: str):
    """The file's text, or None for what is not a regular UTF-8 text file (a symlink, a folder, a binary)."""
    path = osp.join(ROOT, name)
    if osp.islink(path) or not osp.isfile(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except UnicodeDecodeError:
        return None


def line_of(text: str, offset: int) -> int:
    return text.count('\n', 0, offset) + 1


@pytest.fixture(scope='module')
def design() -> Dict:
    """Sections (number → body) and equations (number → defining sections) of docs/DESIGN.md."""
    path = osp.join(ROOT, DOC)
    assert osp.isfile(path), f'{DOC} is missing'
    with open(path, encoding='utf-8') as f:
        text = f.read()
    headings = list(HEADING.finditer(text))
    sections = {}
    for i, match in enumerate(headings):
        end = headings[i + 1].start() if i + 1 < len(headings) else len(text)
        sections[int(match.group(1))] = text[match.start():end]
    equations: Dict[int, List[int]] = {}
    for number, body in sections.items():
        in_code = False
        for line in body.splitlines():
            if line.lstrip().startswith('```'):
                in_code = not in_code
                continue
            tag = EQUATION_TAG.search(line)
            if in_code and tag:
                equations.setdefault(int(tag.group(1)), []).append(number)
    return dict(text=text, sections=sections, order=[int(m.group(1)) for m in headings], equations=equations,
                preamble=text[:headings[0].start()] if headings else text)


def citations(text: str) -> List[Tuple[int, str, List[Tuple[int, str]], List[int]]]:
    """``(line, citation text, [(section, title)], [equations])`` of every citation in ``text``."""
    found = []
    for match in CITATION.finditer(text):
        sections, equations = [], []
        for token in TOKEN.finditer(match.group('tail')):
            if token.group('section'):
                sections.append((int(token.group('section')), token.group('title')))
            else:
                first = int(token.group('eq'))
                last = int(token.group('eq_last') or first)
                equations += list(range(first, last + 1))
        found.append((line_of(text, match.start()), ' '.join(match.group(0).split()), sections, equations))
    return found


def test_sections_are_numbered_in_order(design):
    assert design['order'] == list(range(1, len(design['order']) + 1)), \
        f'{DOC}: section headings "## §N" must run 1, 2, 3, ... in order; found {design["order"]}'
    assert len(design['order']) >= 13, f'{DOC}: expected sections §1-§13, found {design["order"]}'


def test_equations_are_numbered_once_and_indexed_where_defined(design):
    equations = design['equations']
    numbers = sorted(equations)
    assert numbers == list(range(1, len(numbers) + 1)), \
        f'{DOC}: equation tags "(Eq. K)" at the end of code lines must be 1..K without gaps; found {numbers}'
    twice = {k: v for k, v in equations.items() if len(v) > 1}
    assert not twice, f'{DOC}: equations defined more than once (equation: sections): {twice}'
    indexed: Dict[int, int] = {}
    for row in INDEX_ROW.finditer(design['preamble']):
        for number in re.findall(r'Eq\. (\d+)', row.group(2)):
            indexed[int(number)] = int(row.group(1))
    defined = {k: v[0] for k, v in equations.items()}
    assert indexed == defined, (
        f'{DOC}: the "Equations by section" table disagrees with where the equations are defined; '
        f'table only: {sorted(set(indexed.items()) - set(defined.items()))}, '
        f'document only: {sorted(set(defined.items()) - set(indexed.items()))}')


def test_every_citation_names_an_existing_section_and_equation(design):
    sections, equations = design['sections'], design['equations']
    checked, problems = 0, []
    for name in tracked_files():
        if not name.endswith(('.py', '.md')):
            continue
        text = read_text(name)
        if text is None:
            continue
        for line, cited, cited_sections, cited_equations in citations(text):
            checked += 1
            where = f'{name}:{line}: "{cited}"'
            for number, title in cited_sections:
                if number not in sections:
                    problems.append(f'{where}: there is no §{number} (sections: §1-§{max(sections)})')
                elif title and title not in sections[number]:
                    problems.append(f'{where}: §{number} has no paragraph "{title}"')
            for number in cited_equations:
                if number not in equations:
                    problems.append(f'{where}: there is no Eq. {number} (equations: 1-{max(equations)})')
                    continue
                numbers = [n for n, _ in cited_sections]
                if numbers and not set(equations[number]) & set(numbers):
                    problems.append(f'{where}: Eq. {number} is defined in §{equations[number][0]}, not in '
                                    + ', '.join(f'§{n}' for n in numbers))
    assert checked, f'no citation of {DOC} found: is the pattern still right?'
    assert not problems, f'{len(problems)} broken citation(s) of {DOC}:\n' + '\n'.join(problems)


def test_no_file_points_at_another_design_document():
    problems = []
    for name in tracked_files():
        text = read_text(name)
        if text is None:
            continue
        for pattern, why in ((re.compile(re.escape(SHARED_FOLDER)), 'the shared briefing folder, which users '
                              'do not have'),
                             (OTHER_DESIGN_FILE, f'a design file other than {DOC}'),
                             (BARE_DESIGN_SECTION, f'a bare section citation; write "{DOC} §N"')):
            for match in pattern.finditer(text):
                start = text.rfind('\n', 0, match.start()) + 1
                end = text.find('\n', match.end())
                snippet = text[start:end if end >= 0 else len(text)].strip()[:100]
                problems.append(f'{name}:{line_of(text, match.start())}: {why}: {snippet}')
    assert not problems, (f'{len(problems)} reference(s) to a design document other than {DOC}:\n'
                          + '\n'.join(problems))


@pytest.mark.parametrize('text, expected', [
    ('see docs/DESIGN.md §5, Eq. 11).', [([5], [11])]),
    ('(docs/DESIGN.md §5, Eq. 19–20)', [([5], [19, 20])]),
    ('`docs/DESIGN.md` §8 and §11):', [([8, 11], [])]),
    ('docs/DESIGN.md\n    §10). Any task', [([10], [])]),
    ('# (docs/DESIGN.md\n# §7, Eq. 22)', [([7], [22])]),
    ('docs/DESIGN.md Eq. 15)', [([], [15])]),
    ('docs/DESIGN.md §9; ``bench §3``', [([9], [])]),
    ('[`docs/DESIGN.md`](docs/DESIGN.md): the design', []),
])
def test_citation_pattern(text, expected):
    got = [([n for n, _ in sections], equations) for _, _, sections, equations in citations(text)]
    assert got == expected


def test_the_checks_catch_what_they_should():
    """The patterns of the second check fire on the forms the lead converts, and not on the right form."""
    right = f'as {DOC} §4 says'
    assert not OTHER_DESIGN_FILE.search(right) and not BARE_DESIGN_SECTION.search(right)
    bare_file = 'DESIGN' + '.md'
    for wrong in (f'({bare_file} §4)', f'# {bare_file[:-3]} §6', f'{SHARED_FOLDER}/{bare_file}', f'x/{bare_file}'):
        assert OTHER_DESIGN_FILE.search(wrong) or BARE_DESIGN_SECTION.search(wrong), wrong
    assert citations(f'{DOC} §5, "What the logs show"')[0][2] == [(5, 'What the logs show')]
