/**
 * Back up one VM from a directory of Proxmox-format configs on a standalone host.
 *
 *   npx tsx examples/backup-vm.ts --config-dir DIR --dumpdir DIR [--storage ID=DIR]... [--run-dir DIR]
 *                                 [--fleece-dir DIR] [--mode snapshot|suspend|stop] [--compress 0|lzo|gzip|zstd]
 *                                 [--bwlimit KiB/s] VMID
 *
 * The VM may be running (started by this library's StandaloneHost, whose run directory holds its QMP
 * socket) or off (then QEMU is started paused for the backup and stopped again). Exit status 0 on
 * success, 255 on failure, like vzdump's CLI; Ctrl-C unwinds the backup.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Effect, Layer } from "effect"
import { parseArgs } from "node:util"
import * as BackupJob from "@vzdump/core/BackupJob"
import * as BackupReporter from "@vzdump/core/BackupReporter"
import * as HostCommand from "@vzdump/core/HostCommand"
import * as StandaloneHost from "@vzdump/core/StandaloneHost"
import * as StockEngine from "@vzdump/core/StockEngine"
import * as VmaTarget from "@vzdump/target-vma/VmaTarget"

const { positionals, values } = parseArgs({
  allowPositionals: true,
  options: {
    "config-dir": { type: "string" },
    "dumpdir": { type: "string" },
    "storage": { type: "string", multiple: true },
    "run-dir": { type: "string", default: "/run/vzdump-ts" },
    "fleece-dir": { type: "string" },
    "mode": { type: "string", default: "snapshot" },
    "compress": { type: "string", default: "zstd" },
    "bwlimit": { type: "string", default: "0" }
  }
})

const vmid = Number(positionals[0])
const mode = values.mode
const compress = values.compress
if (
  !Number.isInteger(vmid) || values["config-dir"] === undefined || values.dumpdir === undefined ||
  (mode !== "snapshot" && mode !== "suspend" && mode !== "stop") ||
  (compress !== "0" && compress !== "1" && compress !== "lzo" && compress !== "gzip" && compress !== "zstd")
) {
  process.stderr.write("usage: backup-vm.ts --config-dir DIR --dumpdir DIR [options] VMID\n")
  process.exit(2)
}
const storages = Object.fromEntries((values.storage ?? []).map((entry) => entry.split("=", 2) as [string, string]))
const runDir = values["run-dir"]

const layer = Layer.mergeAll(
  StandaloneHost.layer({ configDir: values["config-dir"], runDir, storages }),
  StockEngine.layer({ fleeceDir: values["fleece-dir"] ?? `${runDir}/fleece`, socketDir: runDir }).pipe(
    Layer.provide(HostCommand.layer)
  ),
  VmaTarget.layer({ dumpdir: values.dumpdir, compress }),
  BackupReporter.layerStderr
)

const program = BackupJob.backupVm({ vmid, mode, bwlimit: Number(values.bwlimit) }).pipe(
  Effect.tap((result) => Effect.sync(() => process.stdout.write(`${result.archive.location}\n`))),
  Effect.provide(layer),
  Effect.tapErrorCause(() => Effect.sync(() => (process.exitCode = 255))),
  Effect.catchAllCause(() => Effect.void)
)

NodeRuntime.runMain(program)
