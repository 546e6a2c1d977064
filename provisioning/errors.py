"""Provisioning errors. Each message says what failed and what the operator can do next."""


class ProvisioningError(Exception):
    """Base class: an expected failure that the CLI reports as one line and exit status 1."""


class KeyMaterialError(ProvisioningError):
    """A key file is missing, malformed or has unsafe permissions."""


class BundleFormatError(ProvisioningError):
    """The bundle is not a bundle this software understands."""


class SignatureError(ProvisioningError):
    """The manifest signature does not verify against any trusted vendor key."""


class RecipientError(ProvisioningError):
    """The bundle is not addressed to this device, or its key cannot be unwrapped."""


class IntegrityError(ProvisioningError):
    """A payload file or chunk fails its hash or authentication tag."""


class InstallError(ProvisioningError):
    """The installed state cannot be changed as asked."""


class UnsafeFileError(ProvisioningError):
    """A file the installer must copy is a symbolic link, a device, a FIFO or otherwise not a regular file."""


def run_command(prog: str, command, own: tuple[type[Exception], ...]) -> int:
    """Every CLI's error policy: ``command()``'s own errors (``own``) and failed file operations as one line, Ctrl-C
    as 130, anything else as a bug (``report_unexpected``)."""
    import sys

    try:
        return command()
    except own as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a missing file or stick, a full or read-only disk: say which file and why
        print(f"{prog}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception:
        return report_unexpected(prog)


def describe_os_error(exc: OSError) -> str:
    """One line for a failed file operation: why, and which file."""
    return f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")


def report_unexpected(prog: str, journal: bool = False) -> int:
    """For a CLI's ``except Exception``: not one of its own errors, so a bug. Print the traceback (what a report
    needs), then one line saying so. Under journald (``journal``) the traceback is filed at priority debug and
    the line at err, so ``journalctl -p err`` shows the cause in one line. Returns exit status 1."""
    import sys
    import traceback

    exc = sys.exc_info()[1]
    debug, err = ("<7>", "<3>") if journal else ("", "")
    trace = traceback.format_exc().rstrip("\n").split("\n")
    last = f"{prog}: internal error: {type(exc).__name__}: {exc} - a bug; please report it with the traceback above"
    print("\n".join([*(debug + line for line in trace), err + last]), file=sys.stderr)
    return 1
