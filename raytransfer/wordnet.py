"""WordNet 3.0 for the man-made/natural rule, found without a network by default.

ImageNet wnids are WordNet 3.0 noun offsets, so only a 3.0 database will do. Search order:
(1) nltk's own data path (`python -m nltk.downloader wordnet`); (2) a WordNet 3.0 dict folder
such as Debian's `wordnet-base` (/usr/share/wordnet). nltk refuses such a folder (it is outside
its data path and has no `lexnames` file), so we copy it once, with a generated `lexnames`, to
~/.cache/raytransfer/nltk_data/corpora/wordnet and add that root to nltk.data.path.

    wn = load_wordnet(); wn.synset_from_pos_and_offset("n", 1440764)

Overrides: RAYTRANSFER_WORDNET_DIR (one or more dict folders, os.pathsep-separated) or the
`dirs=` parameter replaces the whole search; RAYTRANSFER_WORDNET_DOWNLOAD=1 lets nltk download.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

ENV_DIR = "RAYTRANSFER_WORDNET_DIR"
ENV_DOWNLOAD = "RAYTRANSFER_WORDNET_DOWNLOAD"
DEFAULT_DICT_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/share/wordnet/dict")
REQUIRED_FILES = ("data.noun", "index.noun", "data.adj", "index.adj", "data.adv", "index.adv",
                  "data.verb", "index.verb")
# the files nltk's WordNetCorpusReader reads (its _FILES), less the lexnames we generate
NLTK_FILES = ("cntlist.rev", "index.sense", "index.adj", "index.adv", "index.noun", "index.verb",
              "data.adj", "data.adv", "data.noun", "data.verb", "adj.exc", "adv.exc", "noun.exc", "verb.exc")
STAMP_FILE = "raytransfer-source.txt"
HOW_TO_GET = ("install it with `apt-get install wordnet-base wordnet-sense-index` (Debian/Ubuntu) "
              "or `python -m nltk.downloader wordnet`, or point RAYTRANSFER_WORDNET_DIR at a "
              "WordNet 3.0 dict folder")

# WordNet 3.0 lexicographer files: number, name, syntactic category (lexnames(5WN)); the Debian
# package ships the man page but not the file, and nltk's reader opens it at start-up.
LEXNAMES_30 = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]
SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


class WordNetUnavailable(LookupError):
    """No WordNet 3.0 database could be found (or downloaded)."""


def lexnames_text() -> str:
    """The standard WordNet 3.0 `lexnames` file: '00\\tadj.all\\t3' ... '44\\tadj.ppl\\t3'."""
    return "".join(f"{i:02d}\t{name}\t{SYNTACTIC_CATEGORY[name.split('.')[0]]}\n"
                   for i, name in enumerate(LEXNAMES_30))


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "raytransfer" / "nltk_data"


def load_wordnet(dirs: Sequence[str | os.PathLike] | None = None, *, use_nltk_data: bool | None = None,
                 allow_download: bool | None = None):
    """Return nltk's WordNet 3.0 corpus reader, or raise WordNetUnavailable saying how to get it.

    dirs: WordNet dict folders to try (default: RAYTRANSFER_WORDNET_DIR if set, else the usual
    system folders). When dirs or the env var is given, nltk's data path is skipped unless
    use_nltk_data=True. allow_download (default: RAYTRANSFER_WORDNET_DOWNLOAD=1) lets nltk fetch it.
    """
    env_dirs = os.environ.get(ENV_DIR)
    explicit = dirs is not None or bool(env_dirs)
    if dirs is None:
        dirs = env_dirs.split(os.pathsep) if env_dirs else DEFAULT_DICT_DIRS
    if use_nltk_data is None:
        use_nltk_data = not explicit
    if allow_download is None:
        allow_download = os.environ.get(ENV_DOWNLOAD, "") not in ("", "0", "false", "no")
    return _load_wordnet(tuple(str(d) for d in dirs), use_nltk_data, allow_download)


@functools.lru_cache(maxsize=8)
def _load_wordnet(dirs: tuple[str, ...], use_nltk_data: bool, allow_download: bool):
    try:
        import nltk  # noqa: F401
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as e:
        raise WordNetUnavailable(f"nltk is not installed ({e}); `pip install nltk`, then {HOW_TO_GET}") from e
    tried = []
    if use_nltk_data:
        reader = _from_nltk_data(WordNetCorpusReader, tried)
        if reader is None and allow_download and _network_reachable():
            log.info("downloading WordNet with nltk.download('wordnet')")
            nltk.download("wordnet", quiet=True)
            reader = _from_nltk_data(WordNetCorpusReader, tried)
        if reader is not None:
            return reader
    for d in dirs:
        reader = _from_dict_dir(WordNetCorpusReader, Path(d), tried)
        if reader is not None:
            return reader
    raise WordNetUnavailable(
        "WordNet 3.0 not found (tried: " + "; ".join(tried or ["nothing"]) + "); " + HOW_TO_GET
        + ". The man-made/natural rule needs it; ImageNet-1k's paper lists (rule paper-lists) do not.")


def _from_nltk_data(reader_cls, tried: list[str]):
    import nltk
    try:
        root = nltk.data.find("corpora/wordnet")
    except LookupError:
        tried.append("nltk data path " + os.pathsep.join(map(str, nltk.data.path)))
        return None
    reader = _open_reader(reader_cls, root)
    if reader.get_version() != "3.0":
        tried.append(f"{root} (WordNet {reader.get_version()}, need 3.0)")
        return None
    log.debug("WordNet 3.0 from nltk data %s", root)
    return reader


def _from_dict_dir(reader_cls, src: Path, tried: list[str]):
    missing = [f for f in REQUIRED_FILES if not (src / f).is_file()]
    if missing:
        tried.append(f"{src} (missing {', '.join(missing[:3])})")
        return None
    try:
        folder = _nltk_folder_for(src)
    except OSError as e:
        tried.append(f"{src} (cannot stage it for nltk under {cache_root()}: {e})")
        return None
    reader = _open_reader(reader_cls, folder)
    if reader.get_version() != "3.0":
        tried.append(f"{src} (WordNet {reader.get_version()}, need 3.0: wnids are 3.0 offsets)")
        return None
    log.debug("WordNet 3.0 from dict folder %s (staged at %s)", src, folder)
    return reader


def _open_reader(reader_cls, root):
    with warnings.catch_warnings():  # "multilingual functions are not available": we need none
        warnings.simplefilter("ignore")
        return reader_cls(str(root) if isinstance(root, Path) else root, None)


def _nltk_folder_for(src: Path) -> Path:
    """An nltk_data/corpora/wordnet folder nltk accepts: copies of src's files plus a lexnames.

    Copies, not symlinks: nltk >= 3.10 refuses files that resolve outside its data path, and
    any folder outside nltk.data.path, so the cache root is added to nltk.data.path too.
    """
    import nltk
    data_root = cache_root()
    if str(data_root) not in map(str, nltk.data.path):
        nltk.data.path.append(str(data_root))
    folder = data_root / "corpora" / "wordnet"
    stamp = _source_stamp(src)
    if _stamp_of(folder) == stamp:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("staging WordNet from %s for nltk in %s (one-time copy)", src, folder)
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=folder.parent))
    try:
        for name in NLTK_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        (tmp / "lexnames").write_text(lexnames_text())
        (tmp / STAMP_FILE).write_text(stamp)
        os.chmod(tmp, 0o755)
        if folder.exists() and _stamp_of(folder) != stamp:
            shutil.rmtree(folder, ignore_errors=True)  # stale: staged from another source
        os.replace(tmp, folder)
    except OSError:
        if _stamp_of(folder) != stamp:  # another process did not win the race either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _source_stamp(src: Path) -> str:
    """Identifies the source files: path, sizes and mtimes."""
    parts = [str(src.resolve())]
    for name in NLTK_FILES:
        f = src / name
        if f.is_file():
            st = f.stat()
            parts.append(f"{name} {st.st_size} {int(st.st_mtime)}")
    return "\n".join(parts) + "\n"


def _stamp_of(folder: Path) -> str | None:
    try:
        return (folder / STAMP_FILE).read_text()
    except OSError:
        return None


def _network_reachable(host: str = "raw.githubusercontent.com", timeout_s: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        log.warning("no network to %s within %.0f s; not downloading WordNet", host, timeout_s)
        return False
