"""Mount a composefs image: the EROFS image read-only, overlayfs stacked on top of it.

What ``mount.composefs`` (composefs 1.0.8) does, in Python with ``ctypes`` system calls:

1. Open the image once (``O_RDONLY``). Everything after that works on this descriptor: the
   ``digest=`` check measures it (kernel fs-verity where the file has it, else the fs-verity digest
   computed in user space from the descriptor), the header is read from it, and the kernel mounts
   it through ``/proc/self/fd/N`` (a file-backed EROFS mount, Linux >= 6.12) or through a read-only
   loop device configured from it (``LOOP_CONFIGURE``, autoclear). The checked file is the mounted
   file.
2. Mount EROFS with the new mount API (``fsopen``/``fsconfig``/``fsmount``) as a *detached* mount:
   it has no place in any directory tree, only a file descriptor.
3. Create overlayfs with ``metacopy=on,redirect_dir=on``, the EROFS mount as the one lower layer and
   the base directories as data-only layers, and attach it at the mount point. Preferred: the
   layer given by descriptor (``fsconfig(FSCONFIG_SET_FD, "lowerdir+")``, Linux >= 6.13), so no
   temporary directory is ever created. Fallbacks, in this order, for older kernels: the EROFS
   mount attached on a private temporary directory and named by path (``lowerdir+``/``datadir+``,
   Linux >= 6.7), then the legacy ``mount(2)`` string ``lowerdir=meta::data1::data2`` (data-only
   layers, Linux >= 6.5), then ``lowerdir=meta:data1:data2``. A temporary directory is detached
   (``umount2(MNT_DETACH)``) and removed as soon as overlayfs holds its layer.

After ``umount MOUNTPOINT`` nothing remains: the EROFS mount only lived inside the overlay, the loop
device (if any) clears itself, no directory was left behind.

Verity (options as upstream):

* ``verity``: overlayfs ``verity=require`` (every file of the image must carry an fs-verity digest
  and every backing object must have fs-verity enabled with that digest). Refused with a clear
  message on a kernel built without fs-verity, where no file could ever be read.
* ``tryverity``: ``verity=require`` when the kernel has fs-verity and overlayfs accepts the option;
  otherwise nothing.
* ``digest=HEX``: the image must have this fs-verity digest. Like upstream it implies ``verity``
  where the kernel has fs-verity; on a kernel without fs-verity only the image is checked (there is
  nothing to check the objects with). ``noverity`` turns the implied verity off.
* ``noverity``: no verity checks by overlayfs (the default when none of the above is given).

The package, by job:

* ``mkcfs.mount.kernel``: the ``ctypes`` system calls, ioctls and their constants;
* ``mkcfs.mount.options``: ``-o`` option parsing into ``MountOptions``, ``MountError``;
* ``mkcfs.mount.mounter``: the checks and the mount itself (``mount_image``, ``umount``).
"""

from __future__ import annotations

from mkcfs.mount.mounter import (
    TEMP_PREFIX,
    MountResult,
    enter_mount_namespace,
    is_privileged,
    kernel_has_fsverity,
    mount_image,
    umount,
)
from mkcfs.mount.options import (
    MOUNT_SOURCE,
    VERITY_OFF,
    VERITY_REQUIRE,
    VERITY_TRY,
    MountError,
    MountOptions,
    parse_options,
    split_options,
)

__all__ = [
    "MountError",
    "MountOptions",
    "MountResult",
    "is_privileged",
    "kernel_has_fsverity",
    "mount_image",
    "parse_options",
    "split_options",
    "umount",
    "TEMP_PREFIX",
    "MOUNT_SOURCE",
    "VERITY_OFF",
    "VERITY_REQUIRE",
    "VERITY_TRY",
    "enter_mount_namespace",
]
