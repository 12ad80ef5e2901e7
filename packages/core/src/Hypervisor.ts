/**
 * The hypervisor: power state of a VM, starting it paused, orderly shutdown, stop, suspend and
 * resume, and access to its QMP monitor and guest agent. The standalone host profile
 * (`StandaloneHost`) runs `qemu-system-x86_64` itself; a Proxmox-host profile drives `qm`.
 *
 * QEMU serves one client per monitor socket and per guest-agent chardev, so `monitor` and `guestAgent`
 * hand out a connection shared by every user inside this process (reference-counted, closed when the
 * last scope using it closes).
 *
 * @since 0.1.0
 */
import * as Context from "effect/Context"
import type * as Duration from "effect/Duration"
import type * as Effect from "effect/Effect"
import * as Schema from "effect/Schema"
import type * as Scope from "effect/Scope"
import type { GuestAgentService } from "@vzdump/qmp/GuestAgent"
import type { QmpClientService } from "@vzdump/qmp/QmpClient"
import type * as VmConfig from "./VmConfig.js"

/**
 * @since 0.1.0
 * @category errors
 */
export class HypervisorError extends Schema.TaggedError<HypervisorError>("@vzdump/core/HypervisorError")(
  "HypervisorError",
  {
    vmid: Schema.Number,
    operation: Schema.Literal("status", "start", "shutdown", "stop", "suspend", "resume", "monitor", "agent"),
    detail: Schema.String
  }
) {
  override get message(): string {
    return `VM ${this.vmid}: ${this.operation} failed - ${this.detail}`
  }
}

/**
 * @since 0.1.0
 * @category models
 */
export interface QemuVersion {
  readonly major: number
  readonly minor: number
  readonly micro: number
}

/**
 * @since 0.1.0
 * @category models
 */
export interface VmRunState {
  /** A QEMU process exists for the VM (whatever its run state). */
  readonly running: boolean
  /** `query-status`'s `status` (`running`, `paused`, `prelaunch`, `io-error`, …) when running. */
  readonly qmpStatus?: string
  /** The running QEMU's version, from the QMP greeting. */
  readonly qemuVersion?: QemuVersion
}

/**
 * @since 0.1.0
 * @category models
 */
export interface HypervisorService {
  readonly status: (vmid: number) => Effect.Effect<VmRunState, HypervisorError>
  /** Starts QEMU for the config with the CPUs stopped (`prelaunch`). */
  readonly startPaused: (vmid: number, config: VmConfig.VmConfig) => Effect.Effect<void, HypervisorError>
  /** ACPI power-down, then waits for QEMU to exit; fails when it is still running after `timeout`. */
  readonly shutdown: (vmid: number, timeout: Duration.DurationInput) => Effect.Effect<void, HypervisorError>
  /** Ends QEMU (`quit`, then a kill if it does not exit). */
  readonly stop: (vmid: number) => Effect.Effect<void, HypervisorError>
  readonly suspend: (vmid: number) => Effect.Effect<void, HypervisorError>
  readonly resume: (vmid: number) => Effect.Effect<void, HypervisorError>
  readonly monitor: (vmid: number) => Effect.Effect<QmpClientService, HypervisorError, Scope.Scope>
  readonly guestAgent: (vmid: number) => Effect.Effect<GuestAgentService, HypervisorError, Scope.Scope>
}

/**
 * @since 0.1.0
 * @category tags
 */
export class Hypervisor extends Context.Tag("@vzdump/core/Hypervisor")<Hypervisor, HypervisorService>() {}

/**
 * Compares QEMU versions (`a < b` → negative).
 *
 * @since 0.1.0
 * @category utils
 */
export const compareVersion = (a: QemuVersion, b: QemuVersion): number =>
  a.major !== b.major ? a.major - b.major : a.minor !== b.minor ? a.minor - b.minor : a.micro - b.micro
