import { assert, describe, it } from "@effect/vitest"
import { execFile } from "node:child_process"
import * as Fs from "node:fs/promises"
import * as NodePath from "node:path"
import { fileURLToPath } from "node:url"
import { promisify } from "node:util"

const run = promisify(execFile)
const repo = NodePath.resolve(NodePath.dirname(fileURLToPath(import.meta.url)), "..")

describe("examples", () => {
  it("npm run demo:pbs backs up the demo VM twice to the PBS server and restores the second snapshot", async () => {
    const dir = await Fs.mkdtemp("/tmp/vzt-pbsdemo-")
    try {
      const { stdout } = await run("npm", ["run", "--silent", "demo:pbs", "--", dir], { cwd: repo, timeout: 240_000 })
      const archives = [...stdout.matchAll(/INFO: creating Proxmox Backup Server archive '(vm\/100\/[^']+)'/g)]
        .map((m) => m[1])
      assert.strictEqual(archives.length, 2)
      assert.strictEqual((stdout.match(/INFO: Finished Backup of VM 100 \(\d\d:\d\d:\d\d\)/g) ?? []).length, 2)
      // the guest's writes touch 4 chunks (2 per disk) of 24: only those are uploaded the second time
      assert.include(stdout, "INFO: scsi0: dirty-bitmap status: OK (8.0 MiB of 64.0 MiB dirty)")
      assert.include(stdout, "INFO: virtio1: dirty-bitmap status: OK (8.0 MiB of 32.0 MiB dirty)")
      assert.include(stdout, "INFO: using fast incremental mode (dirty-bitmap), 16.0 MiB dirty of 96.0 MiB total")
      assert.include(stdout, "backup 2: backup was done incrementally, reused 80.00 MiB (83%)")
      assert.match(stdout, /backup 2 \(vm\/100\/\S+\): 4 chunks uploaded/)
      assert.match(stdout, /scsi0: restored (\w+) {2}at snapshot \1 {2}live now \w+ {2}MATCH/)
      assert.match(stdout, /virtio1: restored (\w+) {2}at snapshot \1 {2}live now \w+ {2}MATCH/)
      // the datastore stays, in PBS's layout, with both snapshots and their logs
      const snapshots = (await Fs.readdir(NodePath.join(dir, "vm", "100"))).filter((name) => name.endsWith("Z")).sort()
      assert.deepStrictEqual(snapshots, archives.map((a) => a!.split("/")[2]))
      for (const snapshot of snapshots) {
        const files = (await Fs.readdir(NodePath.join(dir, "vm", "100", snapshot))).sort()
        assert.deepStrictEqual(files, [
          "client.log.blob",
          "drive-scsi0.img.fidx",
          "drive-virtio1.img.fidx",
          "index.json.blob",
          "qemu-server.conf.blob"
        ])
      }
      assert.isTrue((await Fs.stat(NodePath.join(dir, ".chunks"))).isDirectory())
    } finally {
      await Fs.rm(dir, { recursive: true, force: true })
    }
  }, 300_000)
})
