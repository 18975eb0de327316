from .anomaly_metrics import anomaly_metrics
from .prototype_health import (format_health_table, nearest_prototype_usage,
                               prototype_health)

__all__ = ['anomaly_metrics', 'format_health_table', 'nearest_prototype_usage',
           'prototype_health']
