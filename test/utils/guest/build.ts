/**
 * Builds the minimal TCG test guest of specs/stock-qemu.md §9.3: the host's Debian kernel plus an
 * initramfs with busybox, the virtio/ext4 modules and qemu-ga. The result is cached by kernel version
 * and a content hash of the init script and binaries.
 *
 * @since 0.1.0
 */
import { createHash } from "node:crypto"
import {
  chmodSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync
} from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { gzipSync } from "node:zlib"
import { Effect } from "effect"
import { attempt, GuestError, run, runText } from "./command.js"

/**
 * Printed on the serial console once qemu-ga has opened its port (and, with `writer=1`, the writer has
 * written its first line).
 *
 * @since 0.1.0
 * @category constants
 */
export const READY_MARKER = "VZDUMP-GUEST-READY"

/**
 * Prefix of every line the guest's `/init` prints on the serial console.
 *
 * @since 0.1.0
 * @category constants
 */
export const LOG_PREFIX = "vzdump-guest:"

/**
 * Name of the virtio-serial port the guest agent listens on.
 *
 * @since 0.1.0
 * @category constants
 */
export const AGENT_PORT_NAME = "org.qemu.guest_agent.0"

/**
 * Kernel modules loaded by `/init`, in this order (spec §9.3), then `evdev` and `button` so that an
 * ACPI power-button press (`system_powerdown`) can be noticed and turned into a clean power-off.
 *
 * @since 0.1.0
 * @category constants
 */
export const GUEST_MODULES: ReadonlyArray<string> = [
  "virtio_ring",
  "virtio",
  "virtio_pci_modern_dev",
  "virtio_pci_legacy_dev",
  "virtio_pci",
  "virtio_blk",
  "virtio_console",
  "crc16",
  "mbcache",
  "jbd2",
  "crc32c_generic",
  "libcrc32c",
  "ext4",
  "evdev",
  "button"
]

/**
 * The guest's `/init` (busybox `sh` as PID 1).
 *
 * Kernel command-line parameter `writer=1` starts a loop that appends `<n> <epoch-seconds> <uptime>` to
 * `/mnt/log.txt` every 0.2 s and runs `sync`. SIGUSR1/SIGUSR2/SIGTERM to PID 1 (busybox `poweroff`,
 * qemu-ga's `guest-shutdown` via `/sbin/shutdown`, or the ACPI power button) thaw `/mnt`, stop the
 * agent and the writer, unmount `/mnt` and power off.
 *
 * @since 0.1.0
 * @category constants
 */
export const INIT_SCRIPT = `#!/bin/sh
# /init of the vzdump-ts test guest (busybox sh as PID 1)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

say() { echo "${LOG_PREFIX} $*"; }
up() { read -r u _ </proc/uptime; echo "$u"; }
wait_for() {
  i=0
  while ! "$@"; do
    i=$((i + 1))
    [ "$i" -ge 150 ] && return 1
    sleep 0.1
  done
  return 0
}

writer=0
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    writer=1) writer=1 ;;
  esac
done

say "init started uptime=$(up)"
for m in ${GUEST_MODULES.join(" ")}; do
  insmod "/lib/modules/$m.ko" || say "insmod $m failed"
done
say "modules loaded uptime=$(up)"

mounted=0
if wait_for [ -b /dev/vda ]; then
  if mount -t ext4 /dev/vda /mnt; then
    mounted=1
    say "mounted /dev/vda on /mnt type ext4 uptime=$(up)"
  else
    say "mount /dev/vda failed"
  fi
else
  say "no /dev/vda"
fi

port=
find_port() {
  for d in /sys/class/virtio-ports/*; do
    [ -r "$d/name" ] || continue
    if [ "$(cat "$d/name")" = ${AGENT_PORT_NAME} ] && [ -c "/dev/\${d##*/}" ]; then
      port="/dev/\${d##*/}"
      return 0
    fi
  done
  return 1
}
qga_pid=
qga_open() { ls -l "/proc/$qga_pid/fd" 2>/dev/null | grep -q "$port"; }
if wait_for find_port; then
  mkdir -p /run/qga
  /usr/sbin/qemu-ga -m virtio-serial -p "$port" -t /run/qga &
  qga_pid=$!
  if wait_for qga_open; then
    say "qemu-ga started pid=$qga_pid port=$port uptime=$(up)"
  else
    say "qemu-ga did not open $port"
  fi
else
  say "no virtio port named ${AGENT_PORT_NAME}"
fi

writer_pid=
write_loop() {
  n=0
  while :; do
    n=$((n + 1))
    read -r u _ </proc/uptime
    echo "$n $(date +%s) $u" >>/mnt/log.txt
    sync
    [ "$n" = 1 ] && say "writer: line 1 written uptime=$u"
    sleep 0.2
  done
}
if [ "$writer" = 1 ] && [ "$mounted" = 1 ]; then
  write_loop &
  writer_pid=$!
  say "writer started pid=$writer_pid file=/mnt/log.txt"
  wait_for [ -s /mnt/log.txt ] || say "writer wrote nothing"
fi

for d in /sys/class/input/input*; do
  [ "$(cat "$d/name" 2>/dev/null)" = "Power Button" ] || continue
  for e in "$d"/event*; do
    ev="/dev/input/\${e##*/}"
    [ -c "$ev" ] || continue
    (dd if="$ev" of=/dev/null bs=24 count=1 2>/dev/null && kill -USR2 1) &
    say "power button watched on $ev"
  done
done

stopping=0
shutdown_guest() {
  [ "$stopping" = 1 ] && return
  stopping=1
  say "shutdown requested uptime=$(up)"
  [ "$mounted" = 1 ] && fsfreeze --unfreeze /mnt 2>/dev/null
  if [ -n "$qga_pid" ]; then
    kill -KILL "$qga_pid" 2>/dev/null
    wait "$qga_pid" 2>/dev/null
  fi
  if [ -n "$writer_pid" ]; then
    kill "$writer_pid" 2>/dev/null
    wait "$writer_pid" 2>/dev/null
  fi
  sync
  if [ "$mounted" = 1 ]; then
    umount /mnt || mount -o remount,ro /mnt
    say "unmounted /mnt"
  fi
  say "powering off"
  poweroff -f
}
trap shutdown_guest USR1 USR2 TERM INT

say "${READY_MARKER} uptime=$(up) port=$port writer=$writer"
while :; do
  sleep 3600 &
  wait $!
done
`

/**
 * Installed by the initramfs as `/sbin/shutdown`: qemu-ga's `guest-shutdown` runs it; it asks PID 1
 * for the clean power-off of {@link INIT_SCRIPT}.
 *
 * @since 0.1.0
 * @category constants
 */
export const SHUTDOWN_SCRIPT = `#!/bin/sh
kill -USR2 1
`

/**
 * A built guest: kernel and initramfs paths plus what went into them.
 *
 * @since 0.1.0
 * @category models
 */
export interface GuestImage {
  readonly kernel: string
  readonly initrd: string
  readonly kernelVersion: string
  /** Cache key: `<kernel version>-<hash>`. */
  readonly key: string
  readonly dir: string
  /** Whether the image came from the cache rather than being built by this call. */
  readonly fromCache: boolean
  readonly initrdBytes: number
  /** Shared libraries of qemu-ga copied into the initramfs (as found by `ldd`). */
  readonly libraries: ReadonlyArray<string>
  /** Module files copied into the initramfs, in load order. */
  readonly modules: ReadonlyArray<string>
}

/**
 * Where the kernel and its modules come from.
 *
 * @since 0.1.0
 * @category models
 */
export interface KernelSource {
  readonly version: string
  readonly vmlinuz: string
  readonly modulesDir: string
}

/**
 * Default cache directory: `<repo>/.cache/guest`.
 *
 * @since 0.1.0
 * @category constants
 */
export const DEFAULT_CACHE_DIR: string = fileURLToPath(new URL("../../../.cache/guest", import.meta.url))

const BUSYBOX = "/bin/busybox"
const QEMU_GA = "/usr/sbin/qemu-ga"

const sha256 = (data: string | Buffer): string => createHash("sha256").update(data).digest("hex")

const compareVersions = (a: string, b: string): number => a.localeCompare(b, "en", { numeric: true })

/** Whether a modules directory has a `modules.dep` listing every module in {@link GUEST_MODULES}. */
const hasGuestModules = (modulesDir: string): boolean => {
  if (!existsSync(join(modulesDir, "modules.dep"))) return false
  const table = readModulesDep(modulesDir)
  return GUEST_MODULES.every((name) => table.has(name))
}

/** The newest kernel under `<root>/boot` whose modules directory has all guest modules. */
const installedKernel = (root: string): KernelSource | undefined => {
  const bootDir = join(root, "boot")
  if (!existsSync(bootDir)) return undefined
  const versions = readdirSync(bootDir)
    .filter((name) => name.startsWith("vmlinuz-"))
    .map((name) => name.slice("vmlinuz-".length))
    .filter((version) => hasGuestModules(join(root, "lib/modules", version)))
    .sort(compareVersions)
  const version = versions.at(-1)
  return version === undefined ? undefined : {
    version,
    vmlinuz: join(bootDir, `vmlinuz-${version}`),
    modulesDir: join(root, "lib/modules", version)
  }
}

const findKernel = (root: string): Effect.Effect<KernelSource | undefined, GuestError> =>
  attempt("Build", `find kernel under ${root}`, () => installedKernel(root))

/**
 * Fallback when /boot holds no kernel (root only): the package the `linux-image-amd64` metapackage
 * depends on, taken from apt's archive cache or fetched with `apt-get download`, then `dpkg -x`. Only
 * vmlinuz, `modules.dep` and the modules the guest loads are kept, in `<cacheDir>/kernel-root`.
 */
const packageKernel = (cacheDir: string): Effect.Effect<KernelSource, GuestError> =>
  Effect.gen(function*() {
    const root = join(cacheDir, "kernel-root")
    const existing = yield* findKernel(root)
    if (existing) return existing
    if (process.getuid?.() !== 0) {
      return yield* new GuestError({
        reason: "Build",
        message: "no kernel in /boot and not root: install linux-image-amd64 (scripts/install-prereqs.sh)"
      })
    }
    const depends = yield* runText("apt-cache", ["depends", "linux-image-amd64"])
    const pkg = /Depends:\s*(linux-image-\S+)/.exec(depends)?.[1]
    if (pkg === undefined) {
      return yield* new GuestError({ reason: "Build", message: `cannot resolve linux-image-amd64: ${depends}` })
    }
    const findDeb = (dir: string) =>
      existsSync(dir)
        ? readdirSync(dir).filter((name) => name.startsWith(`${pkg}_`) && name.endsWith(".deb")).sort(compareVersions)
          .map((name) => join(dir, name)).at(-1)
        : undefined
    const downloadDir = join(cacheDir, "download")
    let deb = findDeb("/var/cache/apt/archives") ?? findDeb(downloadDir)
    if (deb === undefined) {
      yield* attempt("Build", "create download dir", () => mkdirSync(downloadDir, { recursive: true }))
      yield* run("apt-get", ["download", pkg], { cwd: downloadDir })
      deb = findDeb(downloadDir)
    }
    if (deb === undefined) {
      return yield* new GuestError({ reason: "Build", message: `apt-get download ${pkg} produced no .deb` })
    }
    const extracted = `${root}.tmp-${process.pid}`
    const slim = `${root}.slim-${process.pid}`
    const result = Effect.gen(function*() {
      yield* attempt("Build", "prepare kernel root", () => {
        rmSync(extracted, { recursive: true, force: true })
        mkdirSync(extracted, { recursive: true })
      })
      yield* run("dpkg", ["-x", deb, extracted])
      // the package ships no modules.dep (its postinst runs depmod): generate it in the extracted tree
      const version = yield* attempt("Build", "find extracted kernel", () =>
        readdirSync(join(extracted, "boot")).find((name) => name.startsWith("vmlinuz-"))?.slice("vmlinuz-".length))
      if (version !== undefined && !existsSync(join(extracted, "lib/modules", version, "modules.dep"))) {
        yield* run("depmod", ["-b", extracted, version])
      }
      const full = yield* findKernel(extracted)
      if (full === undefined) {
        return yield* new GuestError({ reason: "Build", message: `${deb} holds no vmlinuz/modules` })
      }
      const table = yield* attempt("Build", "read modules.dep", () => readModulesDep(full.modulesDir))
      yield* attempt("Build", "install kernel root", () => {
        const copy = (relative: string) => {
          const target = join(slim, relative)
          mkdirSync(dirname(target), { recursive: true })
          copyFileSync(join(extracted, relative), target)
        }
        rmSync(slim, { recursive: true, force: true })
        copy(`boot/vmlinuz-${full.version}`)
        copy(`lib/modules/${full.version}/modules.dep`)
        for (const name of GUEST_MODULES) {
          const entry = table.get(name)
          if (entry !== undefined) copy(`lib/modules/${full.version}/${entry.path}`)
        }
        rmSync(root, { recursive: true, force: true })
        renameSync(slim, root)
      })
      const kernel = yield* findKernel(root)
      if (kernel === undefined) {
        return yield* new GuestError({ reason: "Build", message: `${root} holds no vmlinuz/modules` })
      }
      return kernel
    })
    return yield* result.pipe(Effect.ensuring(Effect.sync(() => {
      rmSync(extracted, { recursive: true, force: true })
      rmSync(slim, { recursive: true, force: true })
    })))
  })

/** `modules.dep`: module name → { path relative to the modules dir, dependency names }. */
const readModulesDep = (modulesDir: string): Map<string, { path: string; deps: Array<string> }> => {
  const nameOf = (path: string) => path.slice(path.lastIndexOf("/") + 1).replace(/\.ko(\.(xz|zst|gz))?$/, "")
  const table = new Map<string, { path: string; deps: Array<string> }>()
  for (const line of readFileSync(join(modulesDir, "modules.dep"), "utf8").split("\n")) {
    const colon = line.indexOf(":")
    if (colon <= 0) continue
    const path = line.slice(0, colon)
    const deps = line.slice(colon + 1).trim().split(/\s+/).filter((d) => d.length > 0).map(nameOf)
    table.set(nameOf(path).replace(/-/g, "_"), { path, deps: deps.map((d) => d.replace(/-/g, "_")) })
  }
  return table
}

const readModule = (file: string): Effect.Effect<Buffer, GuestError> => {
  if (file.endsWith(".ko.xz")) return run("xz", ["-dc", file])
  if (file.endsWith(".ko.zst")) return run("zstd", ["-dcq", file])
  if (file.endsWith(".ko.gz")) return run("gzip", ["-dc", file])
  return attempt("Build", `read ${file}`, () => readFileSync(file))
}

/** Paths of the shared libraries (and the dynamic loader) `ldd` lists for a binary. */
const sharedLibraries = (binary: string): Effect.Effect<Array<string>, GuestError> =>
  Effect.map(runText("ldd", [binary]), (out) => {
    const paths: Array<string> = []
    for (const line of out.split("\n")) {
      const match = /=>\s*(\/\S+)/.exec(line) ?? /^\s*(\/\S+)\s+\(0x/.exec(line)
      if (match?.[1] !== undefined) paths.push(match[1])
    }
    return paths
  })

const cacheKey = (kernel: KernelSource): Effect.Effect<string, GuestError> =>
  attempt("Build", "hash guest inputs", () => {
    const hash = sha256(
      [INIT_SCRIPT, SHUTDOWN_SCRIPT, sha256(readFileSync(BUSYBOX)), sha256(readFileSync(QEMU_GA))].join("\0")
    )
    return `${kernel.version}-${hash.slice(0, 16)}`
  })

interface Manifest {
  readonly kernelVersion: string
  readonly libraries: ReadonlyArray<string>
  readonly modules: ReadonlyArray<string>
}

const loadCached = (dir: string, key: string): GuestImage | undefined => {
  const manifestPath = join(dir, "manifest.json")
  const initrd = join(dir, "initrd.gz")
  const kernel = join(dir, "vmlinuz")
  if (!existsSync(manifestPath) || !existsSync(initrd) || !existsSync(kernel)) return undefined
  const manifest = JSON.parse(readFileSync(manifestPath, "utf8")) as Manifest
  return {
    kernel,
    initrd,
    kernelVersion: manifest.kernelVersion,
    key,
    dir,
    fromCache: true,
    initrdBytes: statSync(initrd).size,
    libraries: manifest.libraries,
    modules: manifest.modules
  }
}

/** Fills the staging root of the initramfs; returns the manifest. */
const stage = (root: string, kernel: KernelSource): Effect.Effect<Manifest, GuestError> =>
  Effect.gen(function*() {
    const put = (path: string, data: Buffer | string, mode: number) =>
      attempt("Build", `write ${path}`, () => {
        const target = join(root, path)
        mkdirSync(dirname(target), { recursive: true })
        writeFileSync(target, data)
        chmodSync(target, mode)
      })

    yield* attempt("Build", "create initramfs dirs", () => {
      for (const dir of ["proc", "sys", "dev", "mnt", "run", "tmp", "etc", "root", "var", "lib/modules"]) {
        mkdirSync(join(root, dir), { recursive: true })
      }
      symlinkSync("../run", join(root, "var/run"))
    })

    // busybox and one symlink per applet
    yield* put("bin/busybox", yield* attempt("Build", "read busybox", () => readFileSync(BUSYBOX)), 0o755)
    const applets = (yield* runText(BUSYBOX, ["--list-full"])).split("\n").filter((p) => p.length > 0)
    yield* attempt("Build", "link busybox applets", () => {
      for (const applet of applets) {
        const target = join(root, applet)
        if (applet === "bin/busybox" || existsSync(target)) continue
        mkdirSync(dirname(target), { recursive: true })
        symlinkSync("/bin/busybox", target)
      }
    })

    // kernel modules, checked against modules.dep so that a kernel update cannot silently break the order
    const table = yield* attempt("Build", "read modules.dep", () => readModulesDep(kernel.modulesDir))
    const modules: Array<string> = []
    for (const [index, name] of GUEST_MODULES.entries()) {
      const entry = table.get(name)
      if (entry === undefined) {
        return yield* new GuestError({ reason: "Build", message: `module ${name} not in ${kernel.modulesDir}` })
      }
      const missing = entry.deps.filter((dep) => !GUEST_MODULES.slice(0, index).includes(dep))
      if (missing.length > 0) {
        return yield* new GuestError({
          reason: "Build",
          message: `module ${name} depends on ${missing.join(", ")}, not loaded before it`
        })
      }
      yield* put(`lib/modules/${name}.ko`, yield* readModule(join(kernel.modulesDir, entry.path)), 0o644)
      modules.push(entry.path)
    }

    // qemu-ga and its shared libraries at the same paths
    yield* put("usr/sbin/qemu-ga", yield* attempt("Build", "read qemu-ga", () => readFileSync(QEMU_GA)), 0o755)
    const libraries = yield* sharedLibraries(QEMU_GA)
    for (const library of libraries) {
      // readFileSync follows symlinks, so the loader's symlink becomes a regular file
      yield* put(library.slice(1), yield* attempt("Build", `read ${library}`, () => readFileSync(library)), 0o755)
    }

    yield* put("init", INIT_SCRIPT, 0o755)
    yield* put("sbin/shutdown", SHUTDOWN_SCRIPT, 0o755)
    return { kernelVersion: kernel.version, libraries, modules }
  })

/** `find . | sort | busybox cpio -o -H newc`, gzipped in-process. */
const pack = (root: string, output: string): Effect.Effect<void, GuestError> =>
  Effect.gen(function*() {
    const list = (yield* runText("find", ["."], { cwd: root }))
      .split("\n")
      .filter((p) => p.length > 0)
      .sort()
    const archive = yield* run(BUSYBOX, ["cpio", "-o", "-H", "newc"], { cwd: root, input: `${list.join("\n")}\n` })
    yield* attempt("Build", `write ${output}`, () => writeFileSync(output, gzipSync(archive, { level: 6 })))
  })

/**
 * Options of {@link buildGuest}.
 *
 * @since 0.1.0
 * @category models
 */
export interface BuildGuestOptions {
  /**
   * `auto` (default): the newest kernel in /boot with its /lib/modules, else the Debian package;
   * `package`: always the `linux-image-amd64` package (apt cache or `apt-get download`, root only).
   */
  readonly kernelSource?: "auto" | "package"
}

/**
 * Builds (or takes from the cache) the test guest's kernel and initramfs.
 *
 * The cache entry `<cacheDir>/<kernel version>-<hash>` is keyed by the kernel version and a hash of
 * {@link INIT_SCRIPT}, {@link SHUTDOWN_SCRIPT}, busybox and qemu-ga; it is written to a temporary
 * directory and renamed into place, so concurrent builders never see a half-written entry.
 *
 * @since 0.1.0
 * @category constructors
 */
export const buildGuest = (
  cacheDir: string = DEFAULT_CACHE_DIR,
  options: BuildGuestOptions = {}
): Effect.Effect<GuestImage, GuestError> =>
  Effect.gen(function*() {
    for (const required of [BUSYBOX, QEMU_GA]) {
      if (!existsSync(required)) {
        return yield* new GuestError({
          reason: "Build",
          message: `${required} is missing (install busybox-static and qemu-guest-agent)`
        })
      }
    }
    yield* attempt("Build", `create ${cacheDir}`, () => mkdirSync(cacheDir, { recursive: true }))
    const installed = (options.kernelSource ?? "auto") === "auto" ? yield* findKernel("/") : undefined
    const kernel = installed ?? (yield* packageKernel(cacheDir))
    const key = yield* cacheKey(kernel)
    const dir = join(cacheDir, key)
    const cached = yield* attempt("Build", `read cache ${dir}`, () => loadCached(dir, key))
    if (cached) return cached

    yield* Effect.logDebug(`building test guest ${key}`)
    const work = yield* attempt("Build", "create build dir", () => mkdtempSync(join(cacheDir, `.build-${key}-`)))
    const built = Effect.gen(function*() {
      const root = join(work, "root")
      const manifest = yield* stage(root, kernel)
      yield* pack(root, join(work, "initrd.gz"))
      yield* attempt("Build", "finish build", () => {
        copyFileSync(kernel.vmlinuz, join(work, "vmlinuz"))
        writeFileSync(join(work, "manifest.json"), JSON.stringify(manifest, null, 2))
        chmodSync(work, 0o755)
        rmSync(root, { recursive: true, force: true })
        try {
          renameSync(work, dir)
        } catch (error) {
          // another builder won the race; its entry is equivalent
          if (!existsSync(join(dir, "manifest.json"))) throw error
        }
      })
      const image = yield* attempt("Build", `read cache ${dir}`, () => loadCached(dir, key))
      if (image === undefined) {
        return yield* new GuestError({ reason: "Build", message: `cache entry ${dir} incomplete after build` })
      }
      return { ...image, fromCache: false }
    })
    return yield* built.pipe(
      Effect.ensuring(Effect.sync(() => rmSync(work, { recursive: true, force: true })))
    )
  }).pipe(Effect.withSpan("guest.buildGuest"))
