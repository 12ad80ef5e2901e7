/**
 * Storage: volume id → host path, activation, size and format. The standalone profile's
 * implementation (`layerDirectories`) knows absolute paths and simple directory storages; the
 * Proxmox-host profile implements the same service through `pvesm`.
 *
 * @since 0.1.0
 */
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Schema from "effect/Schema"
import * as NodePath from "node:path"
import * as Fs from "node:fs/promises"
import { HostCommand } from "./HostCommand.js"
import type { CommandOutput } from "./HostCommand.js"
import * as VmVolumes from "./VmVolumes.js"

/**
 * @since 0.1.0
 * @category errors
 */
export class StorageError extends Schema.TaggedError<StorageError>("@vzdump/core/StorageError")("StorageError", {
  volid: Schema.String,
  reason: Schema.Literal("UnknownStorage", "Missing", "Info"),
  detail: Schema.String
}) {
  override get message(): string {
    return `volume '${this.volid}': ${this.detail}`
  }
}

/**
 * @since 0.1.0
 * @category models
 */
export interface VolumeInfo {
  readonly volid: string
  readonly path: string
  /** `raw`, `qcow2`, … as `qemu-img info` reports it. */
  readonly format: string
  /** Virtual size in bytes. */
  readonly size: number
}

/**
 * @since 0.1.0
 * @category models
 */
export interface StorageService {
  /** The storage id of a volume id, `undefined` for a plain path. */
  readonly storeId: (volid: string) => string | undefined
  readonly path: (volid: string, vmid: number) => Effect.Effect<string, StorageError>
  /** Makes the volumes usable (checks they exist, activates LVs on other profiles). */
  readonly activate: (volids: ReadonlyArray<string>, vmid: number) => Effect.Effect<void, StorageError>
  readonly info: (volid: string, vmid: number) => Effect.Effect<VolumeInfo, StorageError>
}

/**
 * @since 0.1.0
 * @category tags
 */
export class Storage extends Context.Tag("@vzdump/core/Storage")<Storage, StorageService>() {}

/**
 * @since 0.1.0
 * @category models
 */
export interface DirectoryStorageOptions {
  /** Storage id → directory. `local:100/vm-100-disk-0.qcow2` resolves to `<dir>/images/100/vm-100-disk-0.qcow2`. */
  readonly storages: Readonly<Record<string, string>>
}

const QemuImgInfo = Schema.parseJson(Schema.Struct({ "virtual-size": Schema.Number, format: Schema.String }))

/**
 * The storage id of a volume id (`local-lvm:vm-100-disk-0` → `local-lvm`); `undefined` for a path.
 *
 * @since 0.1.0
 * @category volumes
 */
export const storeIdOf = (volid: string): string | undefined => VmVolumes.parseVolumeId(volid)?.storeid

/**
 * Size and format of an image file from `qemu-img info -U --output=json`, run through `run` (which
 * maps the program's failure to a `StorageError` as the profile words it).
 *
 * @since 0.1.0
 * @category volumes
 */
export const imageInfo = (
  volid: string,
  file: string,
  run: (program: string, args: ReadonlyArray<string>) => Effect.Effect<CommandOutput, StorageError>
): Effect.Effect<VolumeInfo, StorageError> =>
  Effect.gen(function*() {
    const out = yield* run("qemu-img", ["info", "-U", "--output=json", file])
    const info = yield* Schema.decodeUnknown(QemuImgInfo)(out.stdout).pipe(
      Effect.mapError((error) => new StorageError({ volid, reason: "Info", detail: `qemu-img info: ${error.message}` }))
    )
    return { volid, path: file, format: info.format, size: info["virtual-size"] }
  })

/**
 * Directory storages and absolute paths. A volume name with a `/` is relative to
 * `<dir>/images/`; one without is looked up in `<dir>/images/<vmid>/`.
 *
 * @since 0.1.0
 * @category constructors
 */
export const makeDirectories = (options: DirectoryStorageOptions) =>
  Effect.map(HostCommand, (command): StorageService => {
    const path = (volid: string, vmid: number): Effect.Effect<string, StorageError> => {
      const storeId = storeIdOf(volid)
      if (storeId === undefined) {
        return volid.startsWith("/")
          ? Effect.succeed(volid)
          : Effect.fail(new StorageError({ volid, reason: "UnknownStorage", detail: "not a path and no storage id" }))
      }
      const dir = options.storages[storeId]
      if (dir === undefined) {
        return Effect.fail(
          new StorageError({ volid, reason: "UnknownStorage", detail: `storage '${storeId}' does not exist` })
        )
      }
      const name = volid.slice(storeId.length + 1)
      if (name.length === 0 || name.split("/").includes("..")) {
        return Effect.fail(new StorageError({ volid, reason: "UnknownStorage", detail: "invalid volume name" }))
      }
      return Effect.succeed(
        name.includes("/") ? NodePath.join(dir, "images", name) : NodePath.join(dir, "images", String(vmid), name)
      )
    }
    const exists = (volid: string, vmid: number) =>
      Effect.flatMap(path(volid, vmid), (file) =>
        Effect.tryPromise({
          try: () => Fs.stat(file),
          catch: (cause) =>
            new StorageError({ volid, reason: "Missing", detail: `${file}: ${(cause as Error).message}` })
        }).pipe(Effect.as(file)))
    return {
      storeId: storeIdOf,
      path,
      activate: (volids, vmid) => Effect.forEach(volids, (volid) => exists(volid, vmid), { discard: true }),
      info: (volid, vmid) =>
        Effect.flatMap(exists(volid, vmid), (file) =>
          imageInfo(volid, file, (program, args) =>
            command.run(program, args).pipe(
              Effect.mapError((error) => new StorageError({ volid, reason: "Info", detail: error.message }))
            )))
    }
  })

/**
 * @since 0.1.0
 * @category layers
 */
export const layerDirectories = (options: DirectoryStorageOptions): Layer.Layer<Storage, never, HostCommand> =>
  Layer.effect(Storage, makeDirectories(options))
