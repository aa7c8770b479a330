"""The networks: layers, ResNets, BYOL's heads and forwards. Pure maths; knows no data or optimiser."""
