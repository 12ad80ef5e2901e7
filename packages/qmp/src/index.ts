/**
 * @vzdump/qmp: clients for QEMU's QMP monitor, its guest agent, and NBD exports.
 * `FdQmpTransport` (native fd passing) and `Usocket` are not re-exported here so that importing the package
 * does not load the native addon: import them as `@vzdump/qmp/FdQmpTransport` and `@vzdump/qmp/Usocket`.
 *
 * @since 0.1.0
 */
export * as GuestAgent from "./GuestAgent.js"
export * as NbdClient from "./NbdClient.js"
export * as NodeQmpTransport from "./NodeQmpTransport.js"
export * as QmpClient from "./QmpClient.js"
export * as QmpError from "./QmpError.js"
export * as QmpSchema from "./QmpSchema.js"
export * as QmpTransport from "./QmpTransport.js"
