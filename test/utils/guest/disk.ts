/**
 * Small ext4 disk images for the test guest (`/dev/vda`, mounted on `/mnt`).
 *
 * @since 0.1.0
 */
import { execFile } from "node:child_process"
import { closeSync, existsSync, ftruncateSync, openSync, rmSync } from "node:fs"
import { Effect } from "effect"
import { attempt, GuestError, run, runText } from "./command.js"

/**
 * Image formats QEMU opens the guest disk with.
 *
 * @since 0.1.0
 * @category models
 */
export type DiskFormat = "raw" | "qcow2"

/**
 * A disk image file and its format.
 *
 * @since 0.1.0
 * @category models
 */
export interface GuestDisk {
  readonly path: string
  readonly format: DiskFormat
}

/**
 * Options of {@link makeExt4Image}.
 *
 * @since 0.1.0
 * @category models
 */
export interface Ext4ImageOptions {
  /** Target file; replaced if it exists. */
  readonly path: string
  /** Size in MiB (default 64). */
  readonly sizeMiB?: number
  /** Directory whose content is copied into the new filesystem (`mkfs.ext4 -d`). */
  readonly contentDir?: string
  readonly label?: string
}

/**
 * Creates a sparse raw image of `sizeMiB` MiB and formats it with `mkfs.ext4 -F -q` (inode tables and
 * journal initialised eagerly, so the guest kernel does no lazy-init writes in the background).
 *
 * @since 0.1.0
 * @category constructors
 */
export const makeExt4Image = (options: Ext4ImageOptions): Effect.Effect<GuestDisk, GuestError> =>
  Effect.gen(function*() {
    const sizeMiB = options.sizeMiB ?? 64
    yield* attempt("Disk", `create ${options.path}`, () => {
      rmSync(options.path, { force: true })
      const fd = openSync(options.path, "w")
      try {
        ftruncateSync(fd, sizeMiB * 1024 * 1024)
      } finally {
        closeSync(fd)
      }
    })
    const args = ["-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
    if (options.label !== undefined) args.push("-L", options.label)
    if (options.contentDir !== undefined) args.push("-d", options.contentDir)
    args.push(options.path)
    yield* run("mkfs.ext4", args).pipe(
      Effect.mapError((e) => new GuestError({ reason: "Disk", message: e.message, cause: e }))
    )
    return { path: options.path, format: "raw" as const }
  })

/**
 * Converts an image with `qemu-img convert` (e.g. a fresh raw ext4 image to qcow2).
 *
 * @since 0.1.0
 * @category utils
 */
export const convertImage = (
  source: GuestDisk,
  path: string,
  format: DiskFormat
): Effect.Effect<GuestDisk, GuestError> =>
  run("qemu-img", ["convert", "-f", source.format, "-O", format, source.path, path]).pipe(
    Effect.mapError((e) => new GuestError({ reason: "Disk", message: e.message, cause: e })),
    Effect.as({ path, format })
  )

/**
 * Creates an ext4 image in the requested format (qcow2 goes through a temporary raw image).
 *
 * @since 0.1.0
 * @category constructors
 */
export const makeGuestDisk = (
  options: Ext4ImageOptions & { readonly format?: DiskFormat }
): Effect.Effect<GuestDisk, GuestError> => {
  if ((options.format ?? "raw") === "raw") return makeExt4Image(options)
  const rawPath = `${options.path}.tmp.raw`
  return makeExt4Image({ ...options, path: rawPath }).pipe(
    Effect.flatMap((raw) => convertImage(raw, options.path, "qcow2")),
    Effect.ensuring(Effect.sync(() => rmSync(rawPath, { force: true })))
  )
}

/**
 * Result of {@link checkExt4}.
 *
 * @since 0.1.0
 * @category models
 */
export interface FsckResult {
  /** `e2fsck` exit status: 0 = clean. */
  readonly exitCode: number
  readonly output: string
}

/**
 * Runs `e2fsck -fn` (forced, read-only) on an image; a qcow2 image is first converted to a temporary raw
 * copy next to it. Never fails on a non-zero fsck status: that is reported in `exitCode`.
 *
 * @since 0.1.0
 * @category utils
 */
export const checkExt4 = (disk: GuestDisk): Effect.Effect<FsckResult, GuestError> => {
  const fsck = (path: string) =>
    Effect.async<FsckResult, GuestError>((resume) => {
      const child = execFile("e2fsck", ["-fn", path], { encoding: "utf8" }, (error, stdout, stderr) => {
        const code = error === null ? 0 : typeof error.code === "number" ? error.code : undefined
        if (code === undefined) {
          resume(Effect.fail(new GuestError({ reason: "Disk", message: `e2fsck: ${error?.message}`, cause: error })))
        } else {
          resume(Effect.succeed({ exitCode: code, output: `${stdout}${stderr}` }))
        }
      })
      return Effect.sync(() => {
        child.kill("SIGKILL")
      })
    })
  if (disk.format === "raw") return fsck(disk.path)
  const rawPath = `${disk.path}.fsck.raw`
  return convertImage(disk, rawPath, "raw").pipe(
    Effect.flatMap((raw) => fsck(raw.path)),
    Effect.ensuring(Effect.sync(() => existsSync(rawPath) && rmSync(rawPath, { force: true })))
  )
}

/**
 * `qemu-img info --output=json` of an image, parsed.
 *
 * @since 0.1.0
 * @category utils
 */
export const imageInfo = (path: string): Effect.Effect<Record<string, unknown>, GuestError> =>
  Effect.flatMap(runText("qemu-img", ["info", "--output=json", "-U", path]), (out) =>
    attempt("Disk", `parse qemu-img info of ${path}`, () => JSON.parse(out) as Record<string, unknown>))
