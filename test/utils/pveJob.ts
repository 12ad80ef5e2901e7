/**
 * Helpers for driving the Proxmox engine directly (without the workflow) against the emulator:
 * build an `EngineJob`, poll the job as vzdump does (faster), read and extract VMA archives.
 */
import { Duration, Effect, Layer } from "effect"
import type { Scope } from "effect"
import * as Fs from "node:fs"
import * as Path from "node:path"
import type { EngineDevice, EngineJob, RunningBackup } from "@vzdump/core/BackupEngine"
import type { BackupStatus } from "@vzdump/core/BackupStatus"
import type { ArchiveSession } from "@vzdump/core/BackupTarget"
import * as HostCommand from "@vzdump/core/HostCommand"
import * as HostProcess from "@vzdump/core/HostProcess"
import * as ProxmoxEngine from "@vzdump/core/ProxmoxEngine"
import type { QmpClientService } from "@vzdump/qmp/QmpClient"
import * as VmaInput from "@vzdump/target-vma/VmaInput"
import * as VmaReader from "@vzdump/target-vma/VmaReader"
import { sha256 } from "./pveFixture.js"

export const CONFIG = "name: demo\nmemory: 64\nscsi0: local:100/vm-100-disk-0.qcow2,size=8M\n" +
  "virtio1: local:100/vm-100-disk-1.raw,size=4M\n#qmdump#map:scsi0:drive-scsi0:local:qcow2:\n" +
  "#qmdump#map:virtio1:drive-virtio1:local:raw:\n"

export const encoder = new TextEncoder()

/** A log that keeps `level: message` lines. */
export const makeLog = () => {
  const lines: Array<string> = []
  return {
    lines,
    log: (level: "info" | "warn", message: string) => Effect.sync(() => void lines.push(`${level}: ${message}`))
  }
}

export const engineLayers = (process?: Layer.Layer<HostProcess.HostProcess>, command?: Layer.Layer<HostCommand.HostCommand>) =>
  Layer.merge(command ?? HostCommand.layer, process ?? HostProcess.layer)

/** The engine, built with the real command services (or the given ones). */
export const makeEngine = (
  options: ProxmoxEngine.ProxmoxEngineOptions = {},
  layers: Layer.Layer<HostCommand.HostCommand | HostProcess.HostProcess> = engineLayers()
) => ProxmoxEngine.make(options).pipe(Effect.provide(layers))

export const job = (fields: {
  readonly qmp: QmpClientService
  readonly archive: ArchiveSession
  readonly devices: ReadonlyArray<EngineDevice>
  readonly log: EngineJob["log"]
  readonly speed?: number
  readonly extra?: ProxmoxEngine.ProxmoxJobOptions
}): ProxmoxEngine.ProxmoxEngineJob => ({
  vmid: 100,
  devices: fields.devices,
  qmp: fields.qmp,
  archive: fields.archive,
  speed: fields.speed ?? 0,
  log: fields.log,
  ...fields.extra
})

/** Polls every 100 ms until the job is no longer active; returns every status seen. */
export const pollUntilEnd = (running: RunningBackup, timeout: Duration.DurationInput = "60 seconds") =>
  Effect.gen(function*() {
    const seen: Array<BackupStatus> = []
    while (true) {
      const status = yield* running.status
      seen.push(status)
      if (status.status !== "active") return seen
      yield* Effect.sleep("100 millis")
    }
  }).pipe(Effect.timeout(timeout), Effect.orDie)

/** Opens an archive file (decompressing as needed) and extracts it into `<dir>`; the disks' sha256. */
export const extractArchive = (file: string, dir: string) =>
  Effect.scoped(Effect.gen(function*() {
    const input = yield* VmaInput.file(file)
    const archive = yield* VmaReader.open(input)
    const result = yield* VmaReader.extract(archive, { directory: dir })
    return {
      header: archive.header,
      stats: result.stats,
      disks: Object.fromEntries(
        result.disks.map((disk) => [disk.device.name, sha256(Fs.readFileSync(Path.join(dir, `disk-${disk.device.name}.raw`)))])
      ) as Record<string, string>,
      configs: Object.fromEntries(
        archive.header.configs.map((config) => [config.name, new TextDecoder().decode(config.data)])
      ) as Record<string, string>
    }
  })).pipe(Effect.orDie)

/** Files in a directory (sorted), for "nothing left behind" checks. */
export const listDir = (dir: string): Array<string> => (Fs.existsSync(dir) ? Fs.readdirSync(dir).sort() : [])

export type Scoped<A> = Effect.Effect<A, never, Scope.Scope>
