"""fusionserve's HTTP service (see the inference service issue); empty until it lands."""
