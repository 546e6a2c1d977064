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
