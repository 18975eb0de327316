from .prototype_update_hook import PrototypeUpdateHook

__all__ = ['PrototypeUpdateHook']
