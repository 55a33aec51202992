"""Device profiles (data files registered by name), resource caps and budget checks. Torch-free."""

from mist_kit.devices.profiles import DeviceProfile, UnknownDeviceError, get_device, list_devices, register_device

__all__ = ["DeviceProfile", "UnknownDeviceError", "get_device", "list_devices", "register_device"]
