/**
 * @vzdump/core: the VM config model, the services of a backup (config store, storage, hypervisor,
 * engine, target, reporter), the workflow and the stock-QEMU engine.
 *
 * @since 0.1.0
 */
export * as ArchiveDestination from "./ArchiveDestination.js"
export * as BackupEngine from "./BackupEngine.js"
export * as BackupJob from "./BackupJob.js"
export * as BackupReporter from "./BackupReporter.js"
export * as BackupStatus from "./BackupStatus.js"
export * as BackupTarget from "./BackupTarget.js"
export * as ConfigStore from "./ConfigStore.js"
export * as HostCommand from "./HostCommand.js"
export * as HostProcess from "./HostProcess.js"
export * as Hypervisor from "./Hypervisor.js"
export * as ProxmoxEngine from "./ProxmoxEngine.js"
export * as ProxmoxHost from "./ProxmoxHost.js"
export * as ProxmoxTarget from "./ProxmoxTarget.js"
export * as QemuCommandLine from "./QemuCommandLine.js"
export * as StandaloneHost from "./StandaloneHost.js"
export * as StockEngine from "./StockEngine.js"
export * as Storage from "./Storage.js"
export * as VmArchiveConfig from "./VmArchiveConfig.js"
export * as VmConfig from "./VmConfig.js"
export * as VmVolumes from "./VmVolumes.js"
export * as VzdumpLog from "./VzdumpLog.js"
export * as VzdumpNames from "./VzdumpNames.js"
export * as VzdumpProgress from "./VzdumpProgress.js"
