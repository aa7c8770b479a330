"""Host-side input: tfds sources, crops, tf.data pipelines, preparing local data sets."""
