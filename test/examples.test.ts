import { assert, describe, it } from "@effect/vitest"
import { execFile } from "node:child_process"
import * as Fs from "node:fs/promises"
import * as NodePath from "node:path"
import { fileURLToPath } from "node:url"
import { promisify } from "node:util"

const run = promisify(execFile)
const repo = NodePath.resolve(NodePath.dirname(fileURLToPath(import.meta.url)), "..")

/** The README's main job and the orchestrator example, run as a user runs them. */
describe("examples", () => {
  it("npm run demo backs up the running demo VM and proves the point-in-time content", async () => {
    const dumps = await Fs.mkdtemp("/tmp/vzt-demo-")
    try {
      const { stdout } = await run("npx", ["tsx", "examples/demo.ts", dumps], { cwd: repo, timeout: 240_000 })
      assert.match(stdout, /INFO: creating vzdump archive '.*\/vzdump-qemu-100-\d{4}_\d\d_\d\d-\d\d_\d\d_\d\d\.vma\.zst'/)
      assert.match(stdout, /INFO: Finished Backup of VM 100 \(\d\d:\d\d:\d\d\)/)
      assert.match(stdout, /scsi0: archive \w+ {2}point in time \w+ {2}live now \w+ {2}MATCH/)
      assert.match(stdout, /virtio1: archive \w+ {2}point in time \w+ {2}live now \w+ {2}MATCH/)
      const files = (await Fs.readdir(dumps)).sort()
      assert.strictEqual(files.length, 2)
      assert.match(files[0]!, /^vzdump-qemu-100-.*\.log$/)
      assert.match(files[1]!, /^vzdump-qemu-100-.*\.vma\.zst$/)
      const { stdout: list } = await run("npx", ["vma", "list", NodePath.join(dumps, files[1]!)], { cwd: repo })
      assert.include(list, "drive-scsi0")
      assert.include(list, "drive-virtio1")
    } finally {
      await Fs.rm(dumps, { recursive: true, force: true })
    }
  }, 300_000)

  it("the orchestrator backs up several VMs concurrently and reports each one", async () => {
    const dumps = await Fs.mkdtemp("/tmp/vzt-orch-")
    try {
      const { stdout } = await run("npx", ["tsx", "examples/orchestrator.ts", "2", "2", dumps], {
        cwd: repo,
        timeout: 240_000
      })
      assert.match(stdout, /VM 200: ok {3}.*vzdump-qemu-200-.*\.vma\.zst/)
      assert.match(stdout, /VM 201: ok {3}.*vzdump-qemu-201-.*\.vma\.zst/)
      assert.match(stdout, /VM 200: 100% of 96 MiB/)
      assert.strictEqual((await Fs.readdir(dumps)).filter((f) => f.endsWith(".vma.zst")).length, 2)
    } finally {
      await Fs.rm(dumps, { recursive: true, force: true })
    }
  }, 300_000)
})
