"""Writing files the user names (``--output``, ``--report-path``) without harming what is there.

A results file is replaced whole or not at all (temporary file beside it, fsync, rename),
but only when the path is, or will be, a regular file: renaming over ``/dev/null``, a FIFO
or a terminal would replace the device node itself. Those are written to directly, and
``/dev/stdout``-style paths go to the descriptor the shell set up. A symlink is followed,
so the file it points to gets the new content and the link stays a link.
"""
import errno
import os
import re
import secrets
import stat
import sys
from pathlib import Path

from common.errors import UserError

# /dev/stdout, /dev/fd/1, /proc/self/fd/1: names for a descriptor this process already holds
DESCRIPTOR_PATH = re.compile(r"/dev/(stdin|stdout|stderr)|/dev/fd/(\d+)|/proc/(?:self|thread-self|\d+)/fd/(\d+)")
STANDARD_STREAMS = {"stdin": 0, "stdout": 1, "stderr": 2}
TEMPORARY_SUFFIX = ".tmp"


def write_output_file(path, content, flag="--output"):
    """Write ``content`` (str as UTF-8, or bytes) to the user-named ``path``; returns where it went.

    A regular file or a new path is replaced atomically (a temporary file in the same
    folder, created with the umask's permissions or the old file's, fsynced, then
    ``os.replace``d), so an interrupted or failed write leaves the previous file as it was
    and no temporary file behind. Symlinks are followed. A character device, FIFO or
    socket, and ``/dev/stdout``-style paths, are written to directly, never renamed over;
    a block device or a directory is refused. Any failure (a full disk, no permission) is
    a UserError naming ``flag`` and the path.
    """
    payload = content.encode("utf-8") if isinstance(content, str) else bytes(content)
    descriptor = descriptor_of(path)
    if descriptor is not None:
        _write_to_descriptor(descriptor, payload, path, flag)
        return Path(path)
    target = resolve_output_path(path, flag)
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as error:
        raise _write_error(flag, path, error) from None
    if mode is not None:
        _check_existing_output(target, path, flag)  # a rename would replace even a read-only file
    if mode is not None and not stat.S_ISREG(mode):
        _write_special_file(target, payload, path, flag)
    else:
        _replace_atomically(target, payload, mode, path, flag)
    return target


def check_output_path(path, flag="--output"):
    """Refuse, before any work is done, an output path that cannot be written; create missing folders.

    For a regular file or a new path this proves a temporary file can be created beside it
    (what ``write_output_file`` will do); a device or FIFO is not opened here (opening a FIFO
    waits for a reader). Returns the path that will be written (symlinks resolved).
    """
    if descriptor_of(path) is not None:
        return Path(path)
    target = resolve_output_path(path, flag)
    if target.exists():
        _check_existing_output(target, path, flag)
        if not target.is_file():
            return target  # a device or FIFO is written in place: nothing is created beside it
    blocking = next((parent for parent in target.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{flag} {path}: {blocking} is a file, not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, probe = _create_temporary(target)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot write there ({error.strerror or error})") from None
    return target


def _check_existing_output(target, shown_path, flag):
    """A directory, a block device or a file without write permission is never written to."""
    mode = target.stat().st_mode
    _refuse_unwritable_special(target, mode, shown_path, flag)
    if not os.access(target, os.W_OK):
        what = "the file is read-only; refusing to replace it" if stat.S_ISREG(mode) else "permission denied"
        raise UserError(f"{flag} {shown_path}: cannot write there ({what})")


def refuse_overwriting_inputs(output_path, inputs, output_flag="--output"):
    """Raise a UserError naming both flags when ``output_path`` would overwrite an input.

    ``inputs`` is an iterable of ``(flag, path)``; None paths are skipped. An output is
    refused when it is the same file as an input file (same inode, so hard links and
    symlinks count; the same resolved path for one not written yet) or an existing file
    inside an input directory (a model's config.json). A new file inside an input
    directory is allowed.
    """
    if output_path is None or descriptor_of(output_path) is not None:
        return
    output = resolve_output_path(output_path, output_flag)
    for flag, input_path in inputs:
        if input_path is None:
            continue
        source = resolve_output_path(input_path, flag)
        if _same_file(output, source) or (source.is_dir() and output.exists() and source in output.parents):
            raise UserError(f"{output_flag} {output_path}: would overwrite {flag} {input_path}; "
                            "write the results somewhere else")


def descriptor_of(path):
    """The open descriptor a path like ``/dev/stdout`` or ``/proc/self/fd/3`` names, else None."""
    match = DESCRIPTOR_PATH.fullmatch(os.path.normpath(str(path)))
    if match is None:
        return None
    name, dev_fd, proc_fd = match.groups()
    if proc_fd is not None and not re.match(rf"/proc/(self|thread-self|{os.getpid()})/", str(path)):
        return None  # another process's descriptor: an ordinary (special) path
    return STANDARD_STREAMS[name] if name else int(dev_fd or proc_fd)


def resolve_output_path(path, flag="--output"):
    """``path`` with every symlink followed (a dangling link names the file to create)."""
    try:
        resolved = Path(os.path.realpath(path, strict=False))
    except (OSError, ValueError) as error:
        raise UserError(f"{flag} {path}: cannot resolve it ({getattr(error, 'strerror', None) or error})") from None
    if Path(path).is_symlink() and resolved.is_symlink():  # realpath stops at a loop
        raise UserError(f"{flag} {path}: a symlink loop")
    return resolved


# ---------------------------------------------------------------- the three ways to write

def _replace_atomically(target, payload, old_mode, shown_path, flag):
    """Temporary file beside ``target`` (same filesystem, so the rename is atomic), then os.replace."""
    temporary = None
    try:
        descriptor, temporary = _create_temporary(target)
        with os.fdopen(descriptor, "wb") as stream:
            if old_mode is not None:  # keep a private results file private
                os.fchmod(stream.fileno(), stat.S_IMODE(old_mode))
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())  # the data is on disk before the name points at it
        os.replace(temporary, target)
        temporary = None
        _fsync_directory(target.parent)
    except OSError as error:
        raise _write_error(flag, shown_path, error, previous_kept=old_mode is not None) from None
    finally:
        if temporary is not None:
            try:
                os.unlink(temporary)
            except OSError:
                pass


def _create_temporary(target):
    """(descriptor, path) of a new hidden file beside ``target``.

    os.open with mode 0o666 lets the umask decide the permissions, as for any new file;
    mkstemp would force 0600, leaving results unreadable to the group that shares them.
    """
    for _ in range(100):
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")
        try:
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), \
                candidate
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target.parent))


def _write_special_file(target, payload, shown_path, flag):
    """Write into a character device, FIFO or socket in place: renaming over it would replace the node."""
    try:
        # no O_CREAT: if the node vanished meanwhile, fail rather than create a regular file there
        descriptor = os.open(target, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise _write_error(flag, shown_path, error) from None
    _write_all(descriptor, payload, shown_path, flag, close=True)


def _refuse_unwritable_special(target, mode, shown_path, flag):
    if stat.S_ISBLK(mode):
        raise UserError(f"{flag} {shown_path}: is a block device; refusing to write results onto a disk")
    if stat.S_ISDIR(mode):
        raise UserError(f"{flag} {shown_path}: is a directory; give a file name")


def _write_to_descriptor(descriptor, payload, shown_path, flag):
    """Write to a descriptor the process holds (``/dev/stdout``), as the shell opened it (append or not)."""
    if descriptor == 1:
        sys.stdout.flush()  # what was printed before comes first
    try:
        duplicate = os.dup(descriptor)
    except OSError as error:
        raise _write_error(flag, shown_path, error) from None
    _write_all(duplicate, payload, shown_path, flag, close=True)


def _write_all(descriptor, payload, shown_path, flag, close):
    try:
        view = memoryview(payload)
        while view:
            written = os.write(descriptor, view)
            view = view[written:]
    except OSError as error:
        raise _write_error(flag, shown_path, error) from None
    finally:
        if close:
            os.close(descriptor)


# ---------------------------------------------------------------- helpers

def _same_file(first, second):
    try:
        return os.path.samefile(first, second)
    except OSError:
        return first == second


def _fsync_directory(directory):
    """Make the rename itself durable; some filesystems cannot fsync a directory, which is fine."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _write_error(flag, path, error, previous_kept=False):
    """One line naming the path: the errors wrapper only converts OSErrors that carry a file name."""
    reason = error.strerror or str(error)
    if previous_kept:
        reason += "; the previous file is unchanged"
    return UserError(f"{flag} {path}: cannot write ({reason})")
